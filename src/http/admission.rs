//! Who gets in, and how much of the server they may hold: the API routes' admission layer.
//!
//! In order, for every API request (ops endpoints never pass here):
//!
//! 1. the per-address rate limit (`rate_limit_requests_per_ip_per_s`, every caller);
//! 2. who is calling (401 here, before anything is read);
//! 3. the per-user limit for client tokens (`rate_limit_requests_per_user_per_s`) and, on the
//!    redeem route, the redemption limit — the admin token (a trusted gateway) is limited per
//!    address only;
//! 4. a declared `Content-Length` over the route's limit: 413 before reading the body;
//! 5. the in-flight budget ([`InFlight`]): requests, body bytes and pings held at once, in total
//!    and per caller (a user, or for the admin and anonymous callers a source address). A
//!    caller may hold at most `1 / caller_share` of each budget, except with its only request
//!    (so one full batch or one large campaign always fits when the server has room): one
//!    flood cannot take it all and a well-behaved phone keeps being served.
//!
//! Over a rate limit: `429 rate_limited` with the bucket's `Retry-After`; over the budget:
//! `429 overloaded`; nothing applied either way.
//!
//! The budget bounds what a caller holds, not the CPU it takes. The handlers that do work in
//! proportion to pings (`POST /v1/pings`) also take the caller's *work share*
//! ([`Ticket::work`]): one caller has at most [`WORK_SHARE_PINGS`] pings being parsed, matched
//! and applied at once, and while other callers work too, at most one request (a flood of
//! 500-ping batches would otherwise run twenty at once), so it keeps at most about one worker
//! busy however many connections it floods from; its other requests wait their turn (in order,
//! for at most [`WORK_WAIT`], then `429 overloaded`). Waiting costs no CPU, and what the waiting requests hold (their bodies) is
//! already counted in the budget, so memory stays bounded too. Within the work, big batches run
//! in slices that yield to the scheduler (see `crate::engine::WORK_SLICE`), so a phone's ping
//! does not wait behind a whole batch on the worker it lands on.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::auth::{bearer, Caller};
use super::error::ApiError;
use super::rate_limit::{retry_after_s, RateKey};
use super::AppState;
use crate::config::{EdgeConfig, HttpConfig};

/// The dimensions of the in-flight budget.
const REQUESTS: usize = 0;
const BYTES: usize = 1;
const PINGS: usize = 2;

/// Amounts in each dimension: requests, body bytes, pings.
type Amounts = [u64; 3];

/// Pings one caller may have in work at once: one full batch. With two workers, a caller
/// flooding full batches keeps one of them busy and leaves the other to everyone else; a
/// caller's single request is never larger than this, so it always fits alone.
pub const WORK_SHARE_PINGS: u32 = crate::http::pings::MAX_BATCH as u32;

/// How recently another caller must have started work for a caller's share to count requests
/// too (see [`Working::others_working`]).
pub const SHARED_WHILE: Duration = Duration::from_secs(1);

/// How long a request waits for its caller's work share before it is refused with
/// `429 overloaded` (its caller then has more queued than it can be served in that time).
pub const WORK_WAIT: Duration = Duration::from_secs(10);

/// The in-flight budget: how much work is held at once, in total and per caller.
pub struct InFlight {
    limits: Amounts,
    shares: Amounts,
    state: Mutex<Held>,
    working: Mutex<Working>,
}

/// Who is working: under one lock, taken once as a request starts work and once as it ends.
#[derive(Default)]
struct Working {
    /// Each caller's work share (a fair, first-come-first-served semaphore of
    /// [`WORK_SHARE_PINGS`] permits) and how many requests hold or wait for it; a caller with
    /// none has no entry, so this is bounded by the requests in flight.
    queues: HashMap<Arc<str>, WorkQueue>,
    /// The last two distinct callers to start work, the most recent first, and when: enough to
    /// tell any caller whether someone else started work within [`SHARED_WHILE`].
    recent: [Option<Started>; 2],
}

/// A caller, and when it last started work.
type Started = (Arc<str>, Instant);

impl Working {
    /// Records that `caller` starts work `now`; answers whether another caller started work within
    /// [`SHARED_WHILE`]. Then a request weighs at least half the share whatever its pings, so the
    /// caller has one request in work at a time: a flood of small batches keeps about one worker
    /// busy, as one of full batches does, and leaves the other to everyone else. A caller alone
    /// (a gateway, a load test) still has as many requests in work as its share holds.
    fn others_working(&mut self, caller: &Arc<str>, now: Instant) -> bool {
        let recent = &mut self.recent;
        let is = |slot: &Option<Started>| slot.as_ref().is_some_and(|(c, _)| c == caller);
        let other = if is(&recent[0]) { &recent[1] } else { &recent[0] };
        let others = other.as_ref().is_some_and(|(_, at)| now.duration_since(*at) < SHARED_WHILE);
        if !is(&recent[0]) {
            recent[1] = recent[0].take();
        }
        recent[0] = Some((caller.clone(), now));
        others
    }
}

/// One caller's work share and how many of its requests hold or wait for it.
struct WorkQueue {
    share: Arc<Semaphore>,
    requests: usize,
}

#[derive(Default)]
struct Held {
    total: Amounts,
    /// What each caller holds; a caller holding nothing has no entry (memory stays bounded by
    /// the requests in flight).
    callers: HashMap<Arc<str>, Amounts>,
}

impl InFlight {
    /// A budget of `max_in_flight` requests and `edge`'s bytes and pings.
    pub fn new(http: &HttpConfig, edge: &EdgeConfig) -> Self {
        let limits = [http.max_in_flight as u64, edge.max_in_flight_body_bytes, edge.max_in_flight_pings];
        let divisor = edge.caller_share.max(1);
        Self {
            limits,
            shares: limits.map(|l| (l / divisor).max(1)),
            state: Mutex::new(Held::default()),
            working: Mutex::new(Working::default()),
        }
    }

    /// Admits one request of `caller` declaring `bytes` of body, or refuses it.
    pub fn admit(self: &Arc<Self>, caller: Arc<str>, bytes: u64) -> Result<Ticket, ApiError> {
        let ticket = Ticket { budget: self.clone(), caller, held: Mutex::new([0; 3]), work: Mutex::new(Vec::new()) };
        ticket.take([1, bytes, 0])?;
        Ok(ticket)
    }

    /// What is held now in total (requests, bytes, pings).
    pub fn held(&self) -> Amounts {
        self.state.lock().total
    }
}

/// What one request holds of the budget; given back when dropped. Shared with the handler
/// (through the request's extensions) so that body bytes beyond the declared length and the
/// pings of a batch are taken once known.
pub struct Ticket {
    budget: Arc<InFlight>,
    caller: Arc<str>,
    held: Mutex<Amounts>,
    /// The caller's work share this request holds ([`Ticket::work`]). A field, dropped after
    /// `Drop::drop` has given the budget back: the caller's next request, which may start the
    /// moment the share is free, then finds this one's pings given back too (it would be
    /// refused for being over the caller's ping share otherwise).
    work: Mutex<Vec<WorkPermit>>,
}

impl Ticket {
    fn take(&self, amounts: Amounts) -> Result<(), ApiError> {
        let budget = &self.budget;
        let mut state = budget.state.lock();
        let caller = state.callers.get(&self.caller).copied().unwrap_or_default();
        let mine = *self.held.lock();
        // Others' requests of this caller: beyond its only one, a caller keeps to its share.
        let alone = caller[REQUESTS] - mine[REQUESTS] == 0;
        for d in 0..3 {
            if amounts[d] == 0 {
                continue;
            }
            let over_total = state.total[d] + amounts[d] > budget.limits[d];
            let over_share = !alone && caller[d] + amounts[d] > budget.shares[d];
            if over_total || over_share {
                metrics::counter!("kabao_http_shed_total").increment(1);
                return Err(ApiError::Overloaded);
            }
        }
        add(state.callers.entry(self.caller.clone()).or_default(), &amounts);
        add(&mut state.total, &amounts);
        add(&mut self.held.lock(), &amounts);
        Ok(())
    }

    /// Takes `n` more body bytes (a body longer than declared, or without a declared length).
    pub fn take_bytes(&self, n: u64) -> Result<(), ApiError> {
        let mut amounts = [0; 3];
        amounts[BYTES] = n;
        self.take(amounts)
    }

    /// Takes `n` pings (a batch weighs its pings, not one request).
    pub fn take_pings(&self, n: u64) -> Result<(), ApiError> {
        let mut amounts = [0; 3];
        amounts[PINGS] = n;
        self.take(amounts)
    }

    /// Body bytes this request holds.
    pub fn bytes(&self) -> u64 {
        self.held.lock()[BYTES]
    }

    /// Waits for `pings` of the caller's work share (at least 1, at most all of it), in the
    /// order the caller's requests asked; after [`WORK_WAIT`], `429 overloaded`. The share is
    /// held until the ticket is dropped, and given back after the rest of the ticket.
    pub async fn work(&self, pings: u64) -> Result<(), ApiError> {
        let permit = self.work_within(pings, WORK_WAIT).await?;
        self.work.lock().push(permit);
        Ok(())
    }

    async fn work_within(&self, pings: u64, wait: Duration) -> Result<WorkPermit, ApiError> {
        let mut n = pings.clamp(1, u64::from(WORK_SHARE_PINGS)) as u32;
        let queue = {
            let mut working = self.budget.working.lock();
            if working.others_working(&self.caller, Instant::now()) {
                n = n.max(WORK_SHARE_PINGS / 2 + 1);
            }
            let entry = working.queues.entry(self.caller.clone()).or_insert_with(|| WorkQueue {
                share: Arc::new(Semaphore::new(WORK_SHARE_PINGS as usize)),
                requests: 0,
            });
            entry.requests += 1;
            entry.share.clone()
        };
        // Counted before waiting, so a request that gives up (or is dropped) uncounts itself.
        let mut permit = WorkPermit { budget: self.budget.clone(), caller: self.caller.clone(), permit: None };
        match tokio::time::timeout(wait, queue.acquire_many_owned(n)).await {
            Ok(Ok(held)) => {
                permit.permit = Some(held);
                Ok(permit)
            }
            // Timed out (the semaphore is never closed).
            _ => {
                metrics::counter!("kabao_http_shed_total").increment(1);
                Err(ApiError::Overloaded)
            }
        }
    }
}

/// A share of a caller's work, held while its pings are processed (see [`Ticket::work`]).
struct WorkPermit {
    budget: Arc<InFlight>,
    caller: Arc<str>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for WorkPermit {
    fn drop(&mut self) {
        // Given back first, so the next waiter may start.
        drop(self.permit.take());
        let queues = &mut self.budget.working.lock().queues;
        if let Some(entry) = queues.get_mut(&self.caller) {
            entry.requests -= 1;
            if entry.requests == 0 {
                queues.remove(&self.caller);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        let mut state = self.budget.state.lock();
        sub(&mut state.total, &held);
        if let Some(entry) = state.callers.get_mut(&self.caller) {
            sub(entry, &held);
            if entry.iter().all(|&a| a == 0) {
                state.callers.remove(&self.caller);
            }
        }
    }
}

fn add(to: &mut Amounts, amounts: &Amounts) {
    to.iter_mut().zip(amounts).for_each(|(t, a)| *t += a);
}

fn sub(from: &mut Amounts, amounts: &Amounts) {
    from.iter_mut().zip(amounts).for_each(|(f, a)| *f -= a);
}

/// The request's ticket, for the handler (absent for requests that skipped admission).
#[derive(Clone)]
pub struct TicketHandle(pub Arc<Ticket>);

/// The route whose requests are redemption attempts.
const REDEEM_ROUTE: &str = "/v1/coupons/{coupon_id}/redeem";

/// The declared body length, when there is one.
pub fn content_length(request: &Request) -> Option<u64> {
    request.headers().get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The admission layer of the API routes (see the module doc).
pub async fn admit(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match admission(&state, &mut request).await {
        Ok(ticket) => {
            let ticket = Arc::new(ticket);
            request.extensions_mut().insert(TicketHandle(ticket.clone()));
            let response = next.run(request).await;
            drop(ticket);
            response
        }
        Err(e) => e.into_response(),
    }
}

async fn admission(state: &AppState, request: &mut Request) -> Result<Ticket, ApiError> {
    let now = Instant::now();
    // Requests that did not come through the accept loop (none in production) share one
    // address.
    let ip = super::serve::peer_addr(request).map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let limits = &state.rate_limits;
    let per_ip = limits.requests_per_ip_per_s;
    if per_ip > 0.0 {
        limit(state, &RateKey::ip(ip), per_ip, per_ip * 10.0, now).await?;
    }
    let caller = state.auth.identify(bearer(request.headers())?)?;
    let fairness_key: Arc<str> = match &caller {
        Caller::Client(user) => {
            crate::telemetry::record_user(user);
            let per_user = limits.requests_per_user_per_s;
            if per_user > 0.0 {
                limit(state, &RateKey::user(user), per_user, per_user * 10.0, now).await?;
            }
            let per_min = limits.redeems_per_user_per_min;
            let redeeming = request.extensions().get::<MatchedPath>().is_some_and(|p| p.as_str() == REDEEM_ROUTE);
            if redeeming && per_min > 0.0 {
                limit(state, &RateKey::redeem(user), per_min / 60.0, per_min, now).await?;
            }
            format!("user:{user}").into()
        }
        Caller::Admin => format!("admin:{ip}").into(),
    };
    let body_limit = state.http.body_limit_for(request.uri().path()) as u64;
    let declared = content_length(request);
    if declared.is_some_and(|n| n > body_limit) {
        return Err(ApiError::PayloadTooLarge);
    }
    let ticket = state.in_flight.admit(fairness_key, declared.unwrap_or(0))?;
    request.extensions_mut().insert(caller);
    Ok(ticket)
}

async fn limit(state: &AppState, key: &RateKey, rate_per_s: f64, burst: f64, now: Instant) -> Result<(), ApiError> {
    state.rate_limiter.take(key, rate_per_s, burst.max(1.0), now).await.map_err(|wait| {
        metrics::counter!("kabao_http_rate_limited_total").increment(1);
        ApiError::RateLimited { retry_after_s: retry_after_s(wait) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(requests: usize, pings: u64, share: u64) -> Arc<InFlight> {
        let http = HttpConfig { max_in_flight: requests, ..HttpConfig::default() };
        let edge = EdgeConfig { max_in_flight_pings: pings, caller_share: share, ..EdgeConfig::default() };
        Arc::new(InFlight::new(&http, &edge))
    }

    #[test]
    fn one_caller_keeps_to_its_share_and_others_still_get_in() {
        let b = budget(64, 80_000, 8);
        let flood: Vec<Ticket> = (0..8).map(|_| b.admit("admin:1.2.3.4".into(), 0).unwrap()).collect();
        assert!(matches!(b.admit("admin:1.2.3.4".into(), 0), Err(ApiError::Overloaded)));
        let phone = b.admit("user:u".into(), 200).unwrap();
        assert_eq!(b.held(), [9, 200, 0]);
        drop(flood);
        drop(phone);
        assert_eq!(b.held(), [0, 0, 0]);
        assert!(b.state.lock().callers.is_empty());
    }

    #[test]
    fn a_callers_only_request_may_be_a_full_batch_but_not_two() {
        let b = budget(64, 80_000, 8);
        let first = b.admit("admin:a".into(), 0).unwrap();
        first.take_pings(10_000).unwrap();
        let second = b.admit("admin:a".into(), 0).unwrap();
        assert!(matches!(second.take_pings(10_000), Err(ApiError::Overloaded)));
        // The total still bounds everyone.
        let others: Vec<Ticket> = (0..7)
            .map(|i| {
                let t = b.admit(format!("admin:{i}").into(), 0).unwrap();
                t.take_pings(10_000).unwrap();
                t
            })
            .collect();
        let last = b.admit("user:late".into(), 0).unwrap();
        assert!(matches!(last.take_pings(1), Err(ApiError::Overloaded)));
        drop(others);
        assert!(last.take_pings(1).is_ok());
    }

    #[tokio::test]
    async fn a_callers_second_full_batch_waits_for_the_first_while_others_work() {
        use futures::FutureExt;
        let b = budget(64, 100_000, 8);
        let first = b.admit("admin:a".into(), 0).unwrap();
        let second = b.admit("admin:a".into(), 0).unwrap();
        first.work(10_000).await.unwrap();
        let mut waiting = Box::pin(second.work(10_000));
        assert!(waiting.as_mut().now_or_never().is_none(), "the share is taken");
        // Another caller is not held up, nor a small request of a third.
        let other = b.admit("admin:b".into(), 0).unwrap();
        let phone = b.admit("user:phone".into(), 0).unwrap();
        assert!(matches!(other.work(10_000).now_or_never(), Some(Ok(()))));
        assert!(matches!(phone.work(1).now_or_never(), Some(Ok(()))));
        drop((other, phone));
        drop(first);
        waiting.await.unwrap();
        assert_eq!(b.working.lock().queues.len(), 1);
        drop(second);
        assert!(b.working.lock().queues.is_empty(), "no entry is kept for callers without work");
    }

    #[tokio::test]
    async fn the_next_request_starts_once_the_previous_ones_pings_are_given_back() {
        use std::future::Future;
        use std::task::{Context, Poll};
        /// A waker that notes the pings held when the waiting request is woken.
        struct Watch {
            budget: Arc<InFlight>,
            pings_at_wake: Mutex<Option<u64>>,
        }
        impl futures::task::ArcWake for Watch {
            fn wake_by_ref(watch: &Arc<Self>) {
                *watch.pings_at_wake.lock() = Some(watch.budget.held()[PINGS]);
            }
        }
        let b = budget(64, 100_000, 8);
        let first = b.admit("admin:a".into(), 0).unwrap();
        first.work(10_000).await.unwrap();
        first.take_pings(10_000).unwrap();
        let second = b.admit("admin:a".into(), 0).unwrap();
        let watch = Arc::new(Watch { budget: b.clone(), pings_at_wake: Mutex::new(None) });
        let waker = futures::task::waker(watch.clone());
        let mut cx = Context::from_waker(&waker);
        let mut waiting = Box::pin(second.work(10_000));
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        drop(first);
        // Woken only once the first's pings were given back (else its take_pings could be
        // refused for being over the caller's share).
        assert_eq!(*watch.pings_at_wake.lock(), Some(0));
        assert!(matches!(waiting.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    }

    #[tokio::test]
    async fn small_requests_share_a_callers_work_and_oversize_weights_fit_alone() {
        use futures::FutureExt;
        let b = budget(64, 100_000, 8);
        let t = b.admit("admin:a".into(), 0).unwrap();
        let a = t.work_within(6_000, WORK_WAIT).await.unwrap();
        let c = t.work_within(4_000, WORK_WAIT).await.unwrap();
        assert!(t.work_within(1, WORK_WAIT).now_or_never().is_none(), "6 000 + 4 000 is the whole share");
        drop((a, c));
        // A weight over the share takes all of it (and 0 takes 1).
        let all = t.work_within(50_000, WORK_WAIT).await.unwrap();
        assert!(t.work_within(0, WORK_WAIT).now_or_never().is_none());
        drop(all);
        assert!(t.work_within(0, WORK_WAIT).now_or_never().is_some());
    }

    #[tokio::test]
    async fn while_others_work_a_callers_small_batches_run_one_at_a_time() {
        use futures::FutureExt;
        let b = budget(64, 100_000, 8);
        let gateway = b.admit("admin:a".into(), 0).unwrap();
        // Alone, a caller's small batches run side by side.
        let one = gateway.work_within(500, WORK_WAIT).await.unwrap();
        let two = gateway.work_within(500, WORK_WAIT).await.unwrap();
        drop((one, two));
        // A phone pings: now each of the gateway's requests weighs half the share or more.
        let phone = b.admit("user:phone".into(), 0).unwrap();
        drop(phone.work_within(1, WORK_WAIT).await.unwrap());
        let one = gateway.work_within(500, WORK_WAIT).await.unwrap();
        let mut two = Box::pin(gateway.work_within(500, WORK_WAIT));
        assert!(two.as_mut().now_or_never().is_none(), "one request in work at a time");
        drop(one);
        assert!(two.now_or_never().is_some());
    }

    #[test]
    fn others_working_looks_at_the_last_two_callers_within_the_window() {
        let mut working = Working::default();
        let (a, c): (Arc<str>, Arc<str>) = ("admin:a".into(), "user:c".into());
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(!working.others_working(&a, at(0)), "nobody else");
        assert!(!working.others_working(&a, at(10)), "only itself");
        assert!(working.others_working(&c, at(20)), "a just now");
        assert!(working.others_working(&a, at(500)), "c at 20 ms");
        assert!(working.others_working(&a, at(1_010)), "c at 20 ms, 990 ms ago");
        assert!(!working.others_working(&a, at(1_030)), "c more than SHARED_WHILE ago");
        assert!(working.others_working(&c, at(1_040)), "a at 1 030 ms");
    }

    #[tokio::test]
    async fn a_request_waiting_past_its_wait_is_overloaded_and_uncounted() {
        let b = budget(64, 100_000, 8);
        let t = b.admit("admin:a".into(), 0).unwrap();
        t.work(10_000).await.unwrap();
        // A zero wait: the share is tried once, then the wait is over.
        assert!(matches!(t.work_within(1, Duration::ZERO).await, Err(ApiError::Overloaded)));
        assert!(t.work_within(1, Duration::ZERO).await.is_err());
        assert_eq!(b.working.lock().queues["admin:a"].requests, 1);
        drop(t);
        assert!(b.working.lock().queues.is_empty());
    }

    #[test]
    fn a_zero_budget_admits_nothing() {
        let b = budget(0, 80_000, 8);
        assert!(matches!(b.admit("user:u".into(), 0), Err(ApiError::Overloaded)));
    }
}
