//! The guest stage: the guest contract (what host and builder agree on),
//! per-run SSH keys, the authenticated session with the builder (exec with
//! streamed output, interactive shell), guest facts, and the provision/
//! scripts built into the binary.

pub mod contract;
pub mod facts;
pub mod keys;
pub mod provision;
pub mod session;

pub use facts::{FactsError, FirstContact, GuestFacts};
pub use keys::RunKeys;
pub use session::{GuestError, GuestSession};
