//! Bounded work per client address: a tower layer on the whole router that lets each
//! client IP have at most a fixed number of requests in progress. A request counts from
//! the moment it arrives until its response body is finished or dropped, so a client
//! that opens streams and never reads them uses up its own allowance, not everyone's.
//! Requests beyond the allowance wait (holding no thread and no storage) for a bounded
//! time, then fail with RESOURCE_EXHAUSTED.
//!
//! A handler that gives up on a stream the client stopped reading can release the
//! request's slot early through the [`ClientSlot`] in the request's extensions: the
//! response body may stay with the HTTP/2 layer until the client resets the stream, but
//! it no longer counts against the client.

use bytes::Bytes;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;
use tonic::Status;

/// Requests one client address may have in progress at once, by default.
pub const DEFAULT_PER_CLIENT: u32 = 256;

/// How long a request may wait for one of its client's slots.
pub const QUEUE_WAIT: Duration = Duration::from_secs(60);

/// The per-address allowances, shared by every connection.
pub struct ClientLimits {
    per_client: usize,
    wait: Duration,
    clients: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
    /// Requests ever admitted or queued: tells an idle server from one between requests.
    started: std::sync::atomic::AtomicU64,
}

impl ClientLimits {
    pub fn new(per_client: u32, wait: Duration) -> Arc<Self> {
        Arc::new(ClientLimits {
            per_client: per_client.max(1) as usize,
            wait,
            clients: Mutex::default(),
            started: Default::default(),
        })
    }

    /// Requests that have arrived since start (with a client address).
    pub fn requests_started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Addresses with requests in progress or waiting. (An entry whose slots are all
    /// free, left by a reference dropped outside the lock, does not count.)
    pub fn active_clients(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| s.available_permits() < self.per_client)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Arc<Semaphore>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for one of `ip`'s slots.
    async fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Status> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let semaphore = self
            .lock()
            .entry(ip)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_client)))
            .clone();
        // Made before waiting: if the request is cancelled while it waits, dropping this
        // still forgets an address that has nothing left in progress.
        let mut permit = Permit {
            permit: None,
            semaphore: Some(semaphore.clone()),
            ip,
            limits: self.clone(),
        };
        if let Ok(p) = semaphore.clone().try_acquire_owned() {
            permit.permit = Some(p);
            return Ok(permit);
        }
        tracing::debug!(client = %ip, limit = self.per_client, "client at its request limit; queueing");
        match tokio::time::timeout(self.wait, semaphore.acquire_owned()).await {
            Ok(Ok(p)) => {
                permit.permit = Some(p);
                Ok(permit)
            }
            _ => {
                tracing::warn!(
                    client = %ip,
                    limit = self.per_client,
                    "refused a request from {ip}: it kept {} requests in progress for {:?}",
                    self.per_client,
                    self.wait
                );
                Err(Status::resource_exhausted(format!(
                    "{ip} has {} requests in progress, the most one client address may have; \
                     none finished within {:?}",
                    self.per_client, self.wait
                )))
            }
        }
    }
}

/// One request's slot; dropping it frees the slot and forgets an address that has
/// nothing left in progress.
struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    /// Taken (and dropped) under the map's lock, so that two slots of one address
    /// dropped at once cannot both see the other's reference and both keep the entry.
    semaphore: Option<Arc<Semaphore>>,
    ip: IpAddr,
    limits: Arc<ClientLimits>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut clients = self.limits.lock();
        drop(self.semaphore.take());
        // Every holder or waiter got its reference under this lock: the map's being the
        // only one left means nobody else is using the entry.
        if clients
            .get(&self.ip)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            clients.remove(&self.ip);
        }
    }
}

/// A request's claim on its client's allowance, in the request's extensions.
#[derive(Clone, Default)]
pub struct ClientSlot(Arc<Mutex<Option<Permit>>>);

impl ClientSlot {
    /// Frees the slot now (a stream abandoned because its client stopped reading).
    pub fn release(&self) {
        let permit = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(permit);
    }
}

/// The layer, for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct ClientLimitLayer(pub Arc<ClientLimits>);

impl<S> tower_layer::Layer<S> for ClientLimitLayer {
    type Service = ClientLimit<S>;

    fn layer(&self, inner: S) -> ClientLimit<S> {
        ClientLimit {
            inner,
            limits: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ClientLimit<S> {
    inner: S,
    limits: Arc<ClientLimits>,
}

type Request = http::Request<Body>;
type Response = http::Response<Body>;

impl<S> tower_service::Service<Request> for ClientLimit<S>
where
    S: tower_service::Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // The clone is not necessarily ready: keep the one that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits.clone();
        let ip = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|info| info.remote_addr)
            .map(|addr| addr.ip().to_canonical());
        Box::pin(async move {
            let slot = ClientSlot::default();
            if let Some(ip) = ip {
                match limits.acquire(ip).await {
                    Ok(permit) => *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit),
                    Err(status) => return Ok(status.into_http()),
                }
            }
            req.extensions_mut().insert(slot.clone());
            let response = inner.call(req).await?;
            Ok(response.map(|body| {
                Body::new(HoldSlot {
                    inner: body,
                    _slot: slot,
                })
            }))
        })
    }
}

/// A response body that keeps its request's slot until it is finished or dropped.
struct HoldSlot {
    inner: Body,
    _slot: ClientSlot,
}

impl http_body::Body for HoldSlot {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_waits_for_its_own_slots_only() {
        let limits = ClientLimits::new(2, Duration::from_millis(100));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = limits.acquire(a).await.unwrap();
        let _p2 = limits.acquire(a).await.unwrap();
        // A third request from the same address waits, then is refused.
        let refused = limits.acquire(a).await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Another address is not affected.
        let pb = limits.acquire(b).await.unwrap();
        assert_eq!(limits.active_clients(), 2);
        drop(pb);
        assert_eq!(limits.active_clients(), 1, "an idle address is forgotten");
        // A freed slot goes to a waiter.
        let waiter = tokio::spawn({
            let limits = limits.clone();
            async move { limits.acquire(a).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(p1);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_request_cancelled_while_waiting_leaves_nothing_behind() {
        let limits = ClientLimits::new(1, Duration::from_secs(10));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let held = limits.acquire(ip).await.unwrap();
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move { limits.acquire(ip).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        assert_eq!(limits.active_clients(), 0, "the address was not forgotten");
    }

    #[tokio::test]
    async fn releasing_a_slot_early_frees_it() {
        let limits = ClientLimits::new(1, Duration::from_millis(50));
        let ip: IpAddr = "::1".parse().unwrap();
        let slot = ClientSlot::default();
        *slot.0.lock().unwrap() = Some(limits.acquire(ip).await.unwrap());
        assert!(limits.acquire(ip).await.is_err());
        slot.release();
        assert!(limits.acquire(ip).await.is_ok());
        assert_eq!(limits.active_clients(), 0);
    }
}
