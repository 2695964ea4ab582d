//! The machine side of every task: Debian packages ([`apt`]), child processes ([`process`]) and
//! what must be cleaned up when a task ends or is interrupted ([`interrupts`]).

pub mod apt;
pub mod interrupts;
pub mod process;
