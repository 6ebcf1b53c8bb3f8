//! The store on disk: LMDB through heed, in `data_dir/store`.

use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn};

use super::{ReadTables, Store, StoreConfig, StoreError, SyncMode, Table, Tables, Visit, FORMAT};
use crate::identity::NodeId;

/// The node's store on disk. Cheap to clone: all clones share one
/// environment.
#[derive(Clone)]
pub struct LmdbStore {
    env: Env,
    path: PathBuf,
    map_size: usize,
    /// The node that owns the store.
    node: NodeId,
    /// One database per [`Table`], in [`Table::ALL`]'s order.
    tables: [Database<Bytes, Bytes>; Table::ALL.len()],
}

impl LmdbStore {
    /// Opens (or creates) the store in `data_dir/store`, refusing one
    /// written by another node or another format.
    pub fn open(
        data_dir: &Path,
        node: NodeId,
        config: &StoreConfig,
    ) -> Result<LmdbStore, StoreError> {
        let path = data_dir.join("store");
        let open_error = |source: heed::Error| match source {
            heed::Error::Mdb(
                e @ (heed::MdbError::Invalid
                | heed::MdbError::Corrupted
                | heed::MdbError::VersionMismatch
                | heed::MdbError::PageNotFound),
            ) => StoreError::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            },
            source => StoreError::Open {
                path: path.clone(),
                source,
            },
        };
        std::fs::create_dir_all(&path).map_err(|e| open_error(e.into()))?;
        let mut options = EnvOpenOptions::new();
        options
            .map_size(config.map_size)
            .max_dbs(Table::ALL.len() as u32 + 1);
        let flags = match config.sync {
            SyncMode::Always => EnvFlags::empty(),
            SyncMode::Never => EnvFlags::NO_SYNC,
        };
        // SAFETY: LMDB requires that no other environment in this process
        // and no other process opens these files while we hold them. The
        // data dir's LOCK (taken by the node before this) guarantees it.
        let env = unsafe { options.flags(flags).open(&path) }.map_err(open_error)?;
        let mut txn = env.write_txn().map_err(open_error)?;
        let mut db = |name: &str| env.create_database::<Bytes, Bytes>(&mut txn, Some(name));
        let meta = db("meta").map_err(open_error)?;
        let mut tables = Vec::with_capacity(Table::ALL.len());
        for table in Table::ALL {
            tables.push(db(table.name()).map_err(open_error)?);
        }
        let tables = tables.try_into().expect("one database per table");
        let corrupt = |detail: &str| StoreError::Corrupt {
            path: path.clone(),
            detail: detail.to_string(),
        };
        match meta.get(&txn, b"format").map_err(open_error)? {
            None => {
                meta.put(&mut txn, b"format", &FORMAT.to_le_bytes())
                    .map_err(open_error)?;
                meta.put(&mut txn, b"node", node.as_bytes())
                    .map_err(open_error)?;
            }
            Some(found) => {
                let found =
                    u32::from_le_bytes(found.try_into().map_err(|_| corrupt("bad format record"))?);
                if found != FORMAT {
                    return Err(StoreError::Format { path, found });
                }
                let owner = meta
                    .get(&txn, b"node")
                    .map_err(open_error)?
                    .ok_or_else(|| corrupt("no node record"))?;
                if owner != node.as_bytes() {
                    return Err(StoreError::Foreign {
                        found: owner.iter().map(|b| format!("{b:02x}")).collect(),
                        path,
                        expected: node,
                    });
                }
            }
        }
        txn.commit().map_err(open_error)?;
        Ok(LmdbStore {
            env,
            path,
            map_size: config.map_size,
            node,
            tables,
        })
    }

    fn db(&self, table: Table) -> Database<Bytes, Bytes> {
        self.tables[table as usize]
    }

    fn read_error(&self, e: heed::Error) -> StoreError {
        match e {
            heed::Error::Mdb(heed::MdbError::Corrupted | heed::MdbError::PageNotFound) => {
                StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: e.to_string(),
                }
            }
            other => StoreError::Other(other),
        }
    }

    /// Classifies an error from a write.
    fn write_error(&self, e: heed::Error) -> StoreError {
        const ENOSPC: i32 = 28;
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::MapFull {
                map_size: self.map_size,
            },
            heed::Error::Io(ref io) if io.raw_os_error() == Some(ENOSPC) => StoreError::DiskFull,
            other => StoreError::Other(other),
        }
    }
}

impl Store for LmdbStore {
    fn location(&self) -> &Path {
        &self.path
    }

    fn owner(&self) -> NodeId {
        self.node
    }

    fn read(
        &self,
        read: &mut dyn FnMut(&dyn ReadTables) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.env.read_txn().map_err(|e| self.read_error(e))?;
        read(&Reading {
            store: self,
            txn: &txn,
        })
    }

    fn write(
        &self,
        write: &mut dyn FnMut(&mut dyn Tables) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut txn = self.env.write_txn().map_err(|e| self.write_error(e))?;
        write(&mut Writing {
            store: self,
            txn: &mut txn,
        })?;
        txn.commit().map_err(|e| self.write_error(e))
    }
}

struct Reading<'s, 't> {
    store: &'s LmdbStore,
    txn: &'t RoTxn<'t>,
}

struct Writing<'s, 't, 'e> {
    store: &'s LmdbStore,
    txn: &'t mut RwTxn<'e>,
}

/// A transaction of the store, read the same way whatever its kind.
trait View {
    fn parts(&self) -> (&LmdbStore, &RoTxn<'_>);
}

impl View for Reading<'_, '_> {
    fn parts(&self) -> (&LmdbStore, &RoTxn<'_>) {
        (self.store, self.txn)
    }
}

impl View for Writing<'_, '_, '_> {
    fn parts(&self) -> (&LmdbStore, &RoTxn<'_>) {
        (self.store, self.txn)
    }
}

impl<V: View> ReadTables for V {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<&[u8]>, StoreError> {
        let (store, txn) = self.parts();
        store
            .db(table)
            .get(txn, key)
            .map_err(|e| store.read_error(e))
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        prefix: &[u8],
        visit: &mut Visit,
    ) -> Result<(), StoreError> {
        let (store, txn) = self.parts();
        // LMDB takes no empty key, even as a bound.
        let start = match from {
            [] => std::ops::Bound::Unbounded,
            from => std::ops::Bound::Included(from),
        };
        let range = (start, std::ops::Bound::Unbounded::<&[u8]>);
        let records = store
            .db(table)
            .range(txn, &range)
            .map_err(|e| store.read_error(e))?;
        for record in records {
            let (key, value) = record.map_err(|e| store.read_error(e))?;
            if !key.starts_with(prefix) || !visit(key, value)? {
                break;
            }
        }
        Ok(())
    }
}

impl Tables for Writing<'_, '_, '_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.store
            .db(table)
            .put(self.txn, key, value)
            .map_err(|e| self.store.write_error(e))
    }

    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        self.store
            .db(table)
            .delete(self.txn, key)
            .map(drop)
            .map_err(|e| self.store.write_error(e))
    }
}
