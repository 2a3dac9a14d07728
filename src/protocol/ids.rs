//! Typed ids. The scheduler never sees Dask keys, only these integers.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

define_id!(
    /// A task. Clients allocate ids inside their own namespace (see [`TaskId::owner`]).
    TaskId(u64)
);
define_id!(
    /// A worker process, assigned by the scheduler at registration.
    WorkerId(u32)
);
define_id!(
    /// A client connection, assigned by the scheduler at the handshake.
    ClientId(u32)
);
define_id!(
    /// A pickled callable, named by a hash of its bytes so identical callables ship once.
    FuncId(u64)
);

/// Bits of a [`TaskId`] that a client numbers freely; the bits above hold its [`ClientId`].
pub const TASK_SEQUENCE_BITS: u32 = 40;

impl TaskId {
    pub fn new(owner: ClientId, sequence: u64) -> TaskId {
        TaskId(
            (u64::from(owner.0) << TASK_SEQUENCE_BITS)
                | (sequence & ((1 << TASK_SEQUENCE_BITS) - 1)),
        )
    }

    /// The client whose namespace this id lies in.
    pub fn owner(self) -> ClientId {
        ClientId((self.0 >> TASK_SEQUENCE_BITS) as u32)
    }
}

/// Hashes ids for the scheduler's and the workers' tables. Ids come from the scheduler
/// or from authenticated clients, so a multiplicative hash (as rustc's FxHash) is safe
/// here and much cheaper than SipHash on the per-task path.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The multiply leaves the best-mixed bits on top; the table indexes by the low ones.
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_carry_their_owner() {
        let id = TaskId::new(ClientId(7), 12345);
        assert_eq!(id.owner(), ClientId(7));
        assert_ne!(TaskId::new(ClientId(8), 12345), id);
    }
}
