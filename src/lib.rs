//! scap: content-addressed deploys for a fleet of MediaWiki app servers.
//!
//! The data path, one module per stage (see ARCHITECTURE.md): staging ->
//! [`manifest`] -> [`store`] -> [`net`] -> [`host`] store -> release slot ->
//! symlink switch; [`fleet`] tells hosts what to run, [`web`] shows it.

pub mod cancel;
pub mod cli;
pub mod config;
pub mod failpoint;
pub mod fleet;
pub mod fuzz;
pub mod hooks;
pub mod host;
pub mod manifest;
pub mod metrics;
pub mod net;
pub mod pki;
pub mod progress;
pub mod proto;
pub mod store;
pub mod sys;
pub mod text;
pub mod time;
pub mod web;
pub mod world;
