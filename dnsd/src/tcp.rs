//! DNS over TCP, served by hickory-server: its [`Server`] accepts the
//! connections, reads the length-prefixed queries and closes a connection
//! that sends no whole query within the idle timeout; [`TcpHandler`] answers
//! each query from the same table and answer code as the UDP threads, or
//! hands it to the forwarder (which asks upstream over TCP too).
//!
//! What hickory-server decides, unlike dnsd's own TCP code before it:
//! * It has no limit on open connections (it accepts every one; idle ones
//!   are closed after the idle timeout). `max_tcp` now bounds the TCP
//!   queries being answered at once: one more is answered REFUSED and
//!   counted in `tcp_refused`. As hickory-server answers the queries of a
//!   connection one after the other, this bounds the connections being
//!   served, not the idle ones.
//! * Pipelined queries on one connection are answered in order, one at a
//!   time (a slow forwarded one holds up those behind it).
//! * It reads each query with hickory-proto before dnsd sees it: a query it
//!   cannot read gets its FORMERR, and responses are ignored.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Header, HeaderCounts, Message, MessageType, Metadata, ResponseCode,
};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::answer::{handle, Action};
use crate::counters::Path;
use crate::server::Ctx;

/// Answers queued for a connection's writer, at most.
const RESPONSE_BUFFER: usize = 16;

/// A TCP listener for `addr`.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    // Like UDP: a new dnsd listens while the old one still does.
    s.set_reuse_port(true)?;
    crate::server::free_bind(&s, addr)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Serves DNS over TCP on `listeners` until the task is dropped (which
/// also ends every connection).
pub(crate) async fn serve(listeners: Vec<TcpListener>, ctx: Arc<Ctx>) {
    let idle = ctx.tcp_idle;
    let mut server = Server::new(TcpHandler::new(ctx));
    for l in listeners {
        server.register_listener(l, idle, RESPONSE_BUFFER);
    }
    if let Err(e) = server.block_until_done().await {
        tracing::warn!(error = %e, "DNS over TCP stopped");
    }
}

/// Answers DNS queries that came over TCP.
pub(crate) struct TcpHandler {
    ctx: Arc<Ctx>,
    /// Queries being answered (`max_tcp` at most).
    busy: Arc<Semaphore>,
}

impl TcpHandler {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        let busy = Arc::new(Semaphore::new(ctx.max_tcp));
        TcpHandler { ctx, busy }
    }

    /// The answer to `packet` from `src`, or `None` to send nothing.
    async fn answer(&self, packet: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let ctx = &self.ctx;
        let received = Instant::now();
        let mut out = vec![0u8; u16::MAX as usize];
        let action = handle(
            &ctx.table.load(),
            &ctx.acl,
            packet,
            src.ip(),
            true,
            &mut out,
        );
        match action {
            Action::Reply(l) => {
                out.truncate(l);
                ctx.stats.local_answers.fetch_add(1, Ordering::Relaxed);
                ctx.stats.queries.count(packet, Some(&out));
                ctx.stats
                    .queries
                    .latency(Path::Local)
                    .observe_n(received.elapsed(), 1);
                Some(out)
            }
            Action::Forward => {
                ctx.stats.queries.count(packet, None);
                let answer = ctx.fwd.resolve(packet, true).await?;
                ctx.stats
                    .queries
                    .count_answer(&answer, Path::Forward, received.elapsed());
                Some(answer)
            }
            Action::Drop => {
                ctx.stats.queries.count(packet, None);
                ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.ctx.stats.tcp_queries.fetch_add(1, Ordering::Relaxed);
        let Ok(_slot) = self.busy.try_acquire() else {
            self.ctx.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(src = %request.src(), "TCP queries at the limit; REFUSED");
            let response = MessageResponseBuilder::new(&request.queries, None)
                .error_msg(&request.metadata, ResponseCode::Refused);
            return response_handle
                .send_response(response)
                .await
                .unwrap_or_else(|_| failed(request));
        };
        let Some(answer) = self.answer(request.as_slice(), request.src()).await else {
            return failed(request);
        };
        // dnsd's answer is wire format; hickory-server writes a response
        // from its parts (the question as the client wrote it).
        let m = match Message::from_vec(&answer) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "unreadable answer; sending nothing");
                return failed(request);
            }
        };
        let response = MessageResponseBuilder::new(&request.queries, m.edns.as_ref()).build(
            m.metadata,
            m.answers.iter(),
            m.authorities.iter(),
            std::iter::empty(),
            m.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, src = %request.src(), "TCP answer not sent");
                failed(request)
            }
        }
    }
}

/// What hickory-server logs for a query that got no answer.
fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}
