//! The service-discovery DNS server (see DESIGN.md). Arrives with the dnsd issue.
