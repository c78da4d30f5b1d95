//! # kabao — a geofence-driven coupon engine
//!
//! Phones send location pings; when a ping enters (or dwells in) a fence of an active campaign,
//! kabao checks the campaign's caps, records a coupon in the user's wallet and pushes it to the
//! user's phones. The contract is `API.md`; this is the map of the code behind it.
//!
//! ```text
//!  POST /v1/pings ─► http ─► domain::PingInput::validate ─► spatial::FenceIndex::matches
//!                                                                  │ hits (campaign, fence)
//!                                                                  ▼
//!                                                   trigger::TriggerEngine::apply   (rules 0–5)
//!                                                                  │ candidates
//!                                                                  ▼
//!                                                   store::Store::issue   (atomic: caps + wallet + outbox)
//!                                                                  │
//!                                 reply with events ◄──────────────┴──► dispatch (FCM / APNs / log)
//! ```
//!
//! | module | owns |
//! | --- | --- |
//! | [`domain`] | validated types (`Ping`, `Fence`, `Campaign`, ids) and the exact containment rule |
//! | [`spatial`] | `FenceIndex` / `LiveIndex`: which fences contain a point — the hot path, pure and in memory |
//! | [`trigger`] | per-user stay state and the trigger rules 0–5, in event time |
//! | [`store`] | campaigns, devices, wallets, caps, outbox behind one trait; the in-memory implementation |
//! | [`ceiling`] | how many users' trigger states are kept, and which go first (`max_tracked_users`) |
//! | [`engine`] | the way through (index → trigger → store) and campaign changes → index |
//! | [`dispatch`] | outbox → push providers, at least once (the `log` provider for the embedded default) |
//! | [`http`] | axum routes, auth, errors, limits, OpenAPI — thin: parse, call, map errors |
//! | [`config`], [`app`] | flags / `KABAO_*` / config file; startup, serving, graceful shutdown |
//! | [`demo`] | `kabao demo`: campaigns from `data/`, seeded shoppers replayed over HTTP |
//! | [`sim`] | seeded simulated phones shared by the demo and the load generator |
//! | [`loadgen`] | `kabao loadgen`: open-loop HTTP load against `/v1/pings`, latency without coordinated omission |
//! | `fuzzing` | the checks the `fuzz/` targets and `tests/fuzz_checks.rs` run on arbitrary bytes |
//! | [`fakepush`] | `kabao fake-push`: protocol-faithful FCM, OAuth2 and APNs fakes over TLS, with fault injection |
//!
//! `spatial` and `trigger` do no I/O and never read the clock, so they are tested against brute
//! force and benchmarked alone. Campaign changes flow the other way: the store is the source of
//! truth, and a new immutable index snapshot is swapped in without pausing matching.

pub mod app;
pub mod ceiling;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod domain;
pub mod engine;
pub mod fakepush;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod loadgen;
pub mod sim;
pub mod spatial;
pub mod store;
pub mod telemetry;
pub mod trigger;
