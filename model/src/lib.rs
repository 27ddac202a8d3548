//! weft's shared model: concepts that more than one crate needs, defined
//! once. Today: the store key layout ([`Keys`]). The architecture issue moves
//! the stored records, validated names and shared defaults here too.

mod keys;

pub use keys::{Keys, DEFAULT_PREFIX};
