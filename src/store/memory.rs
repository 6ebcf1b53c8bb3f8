//! A store in memory: for simulations of many nodes and for tests. It
//! behaves as the one on disk (a failed transaction keeps nothing), and
//! what it holds lasts as long as the value and its clones.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{ReadTables, Store, StoreError, Table, Tables, Visit};
use crate::identity::NodeId;

type Records = [BTreeMap<Vec<u8>, Vec<u8>>; Table::ALL.len()];
/// What a transaction replaced, to put back if it fails.
type Undo = Vec<(Table, Vec<u8>, Option<Vec<u8>>)>;

#[derive(Clone)]
pub struct MemoryStore {
    node: NodeId,
    records: Arc<Mutex<Records>>,
}

impl MemoryStore {
    /// An empty store of node `node`.
    pub fn new(node: NodeId) -> MemoryStore {
        MemoryStore {
            node,
            records: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn location(&self) -> &Path {
        Path::new("(memory)")
    }

    fn owner(&self) -> NodeId {
        self.node
    }

    fn read(
        &self,
        read: &mut dyn FnMut(&dyn ReadTables) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let records = self.lock();
        read(&Transaction {
            records: &*records,
            undo: None,
        })
    }

    fn write(
        &self,
        write: &mut dyn FnMut(&mut dyn Tables) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut records = self.lock();
        let mut undo = Vec::new();
        let mut txn = Transaction {
            records: &mut *records,
            undo: Some(&mut undo),
        };
        let result = write(&mut txn);
        if result.is_err() {
            // Put back what the failed transaction changed, newest first.
            for (table, key, before) in undo.into_iter().rev() {
                let table = &mut records[table as usize];
                match before {
                    Some(value) => table.insert(key, value),
                    None => table.remove(&key),
                };
            }
        }
        result
    }
}

/// A view of the records; writes keep what they replaced in `undo`.
struct Transaction<'a, R> {
    records: R,
    undo: Option<&'a mut Undo>,
}

impl<R: std::ops::Deref<Target = Records>> ReadTables for Transaction<'_, R> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<&[u8]>, StoreError> {
        Ok(self.records[table as usize].get(key).map(Vec::as_slice))
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        prefix: &[u8],
        visit: &mut Visit,
    ) -> Result<(), StoreError> {
        for (key, value) in self.records[table as usize].range(from.to_vec()..) {
            if !key.starts_with(prefix) || !visit(key, value)? {
                break;
            }
        }
        Ok(())
    }
}

impl<R: std::ops::DerefMut<Target = Records>> Tables for Transaction<'_, R> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let before = self.records[table as usize].insert(key.to_vec(), value.to_vec());
        if let Some(undo) = &mut self.undo {
            undo.push((table, key.to_vec(), before));
        }
        Ok(())
    }

    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        let before = self.records[table as usize].remove(key);
        if let (Some(undo), Some(before)) = (&mut self.undo, before) {
            undo.push((table, key.to_vec(), Some(before)));
        }
        Ok(())
    }
}
