//! The machine stage: the pure QEMU argument builder, accelerator choice,
//! QMP control, the lifecycle of one builder VM, and the relay that joins
//! a guest connection to the egress proxy.

pub mod accel;
pub mod args;
pub mod machine;
pub mod qmp;
pub mod relay;

pub use accel::AccelChoice;
pub use args::{Accelerator, EgressRelay, ExtraDisk, MachineSpec, Network, EGRESS_PROXY};
pub use machine::{BootOptions, LaunchedMachine, Machine, VmError};
