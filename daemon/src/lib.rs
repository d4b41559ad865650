//! What every Switchyard process needs besides its own job, written once: settings read through
//! a lookup function ([`settings`]), jittered backoff ([`backoff`]), the container health probe
//! ([`probe`]), logging setup and the shutdown signal ([`process`]), and the wall clock
//! ([`clock`]).
//!
//! It knows nothing of Consul, Docker or HTTP routing.

pub mod backoff;
pub mod clock;
pub mod probe;
pub mod process;
pub mod settings;
