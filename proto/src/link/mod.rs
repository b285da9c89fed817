//! The link protocol, spoken on every hop (coordinator → relay → … → edge), as pure state machines.
//!
//! Events go in (a batch arrived, an ack arrived, time passed), commands come out (apply this,
//! send that ack, reset that receiver). The async runtimes in the other crates only carry the
//! commands out, so every rule here is tested without sockets or clocks.
//!
//! - [`receiver::Receiver`]: high-water mark per shard, gap detection (Nack), duplicate drop,
//!   epoch change → flush, lost-tail detection from heartbeats, acks only of applied seqs.
//! - [`sender::Sender`]: per-receiver window of unacked bytes, go-back retransmission on Nack or
//!   timeout, and the resume/reset decision on Hello.
//! - [`retransmit::RetransmitRing`]: the byte-bounded ring of recent batches, each encoded once and
//!   shared by every receiver that takes it unfiltered.

pub mod receiver;
pub mod retransmit;
pub mod sender;

pub use receiver::{Receiver, ReceiverConfig, RxCommand};
pub use retransmit::{Read, RetransmitRing, SharedBatch, MAX_BATCH_BYTES};
pub use sender::{Sender, SenderConfig, ShardView, TxCommand};

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod model_tests;
