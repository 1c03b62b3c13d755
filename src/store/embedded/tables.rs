//! The queue's tables in one write transaction, each opened at most once per batch of ops.
//!
//! Opening a redb table looks its root up in the table tree and closing it stages the root for
//! the commit: about 3 k instructions each way. The ops of a group commit (an app's write opens
//! two tables, a replayed item's finish three) used to pay that per op; a batch now pays it once
//! per table. redb refuses to open a table twice, so an op that needs the raw transaction (rare
//! ops, the cache) takes it through [`Tables::txn`], which closes what is open first.

use redb::{Table, WriteTransaction};

use super::{DEAD, FINISHED, META, MUTATIONS, QUEUE};
use crate::store::StoreError;

/// The `mutations` table: key → encoded record.
pub(super) type Mutations<'t> = Table<'t, &'static str, &'static [u8]>;
/// The `queue` table: (partition, seq) → key.
pub(super) type QueueTable<'t> = Table<'t, (&'static str, u64), &'static str>;
/// The `dead` table: seq → key.
pub(super) type Dead<'t> = Table<'t, u64, &'static str>;
/// The `finished` table: (finished at ms, key) → ().
pub(super) type Finished<'t> = Table<'t, (u64, &'static str), ()>;
/// The `meta` table: name → counter.
pub(super) type Meta<'t> = Table<'t, &'static str, u64>;

/// The tables a batch of queue ops has opened so far in `txn`.
pub(super) struct Tables<'t> {
    txn: &'t WriteTransaction,
    mutations: Option<Mutations<'t>>,
    queue: Option<QueueTable<'t>>,
    dead: Option<Dead<'t>>,
    finished: Option<Finished<'t>>,
    meta: Option<Meta<'t>>,
}

/// `slot`'s table, opened by `open` the first time.
fn opened<T>(
    slot: &mut Option<T>,
    open: impl FnOnce() -> Result<T, redb::TableError>,
) -> Result<&mut T, StoreError> {
    let table = match slot.take() {
        Some(table) => table,
        None => open()?,
    };
    Ok(slot.insert(table))
}

impl<'t> Tables<'t> {
    /// None open yet.
    pub(super) fn new(txn: &'t WriteTransaction) -> Self {
        Self {
            txn,
            mutations: None,
            queue: None,
            dead: None,
            finished: None,
            meta: None,
        }
    }

    /// The transaction itself, every table of this batch closed (so that the caller may open
    /// any of them).
    pub(super) fn txn(&mut self) -> &'t WriteTransaction {
        self.mutations = None;
        self.queue = None;
        self.dead = None;
        self.finished = None;
        self.meta = None;
        self.txn
    }

    pub(super) fn mutations(&mut self) -> Result<&mut Mutations<'t>, StoreError> {
        let txn = self.txn;
        opened(&mut self.mutations, || txn.open_table(MUTATIONS))
    }

    pub(super) fn queue(&mut self) -> Result<&mut QueueTable<'t>, StoreError> {
        let txn = self.txn;
        opened(&mut self.queue, || txn.open_table(QUEUE))
    }

    pub(super) fn dead(&mut self) -> Result<&mut Dead<'t>, StoreError> {
        let txn = self.txn;
        opened(&mut self.dead, || txn.open_table(DEAD))
    }

    pub(super) fn finished(&mut self) -> Result<&mut Finished<'t>, StoreError> {
        let txn = self.txn;
        opened(&mut self.finished, || txn.open_table(FINISHED))
    }

    pub(super) fn meta(&mut self) -> Result<&mut Meta<'t>, StoreError> {
        let txn = self.txn;
        opened(&mut self.meta, || txn.open_table(META))
    }
}
