//! Tributary edge node: MQTT in, a durable partitioned log on fjall.
//!
//! Data flows one way: socket ([`mqtt`]) -> route ([`route`]) -> log ([`log`]) -> (fan-out,
//! consumer [`groups`], mirror).

pub(crate) mod admin;
pub mod auth;
pub mod check;
pub mod config;
pub mod groups;
pub mod inspect;
pub mod log;
pub mod mqtt;
pub(crate) mod node;
pub mod recent;
pub mod route;
pub mod server;
pub(crate) mod service;
pub mod startup;
pub(crate) mod sys;
pub mod uplink;
