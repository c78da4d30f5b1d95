//! The HTTP API end to end: each test starts the real server on `127.0.0.1:0` over a fresh
//! in-memory store and talks to it with reqwest, as a client would (API.md is the contract).

mod auth;
mod bad_input;
mod campaigns;
mod contract_audit;
mod devices_wallet;
mod edge;
mod helpers;
mod limits;
mod ops;
mod pings;
