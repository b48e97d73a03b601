//! The embedded target of the load generator: a [`Node`] in this process, called directly (no
//! network, no client), so the same closed loop that measures a cluster measures the library
//! itself (`benches/embedded_throughput.rs`).

use std::sync::Arc;

use ::kvnode::Node;
use ::kvnode::consistency::ReadOptions;

use super::{Level, LoadError, OpError, Session, System, Target};

/// A [`Node`] of this process under load; reads at one [`Level`].
#[derive(Debug)]
pub struct EmbeddedTarget {
    node: Arc<Node>,
    level: Level,
    options: ReadOptions,
    /// The load generator's session (session reads only).
    session: Option<Session>,
}

impl EmbeddedTarget {
    /// Loads `node` with reads at `level`.
    ///
    /// # Errors
    ///
    /// [`LoadError::Level`] for `serializable` (etcd's level).
    pub fn new(node: Arc<Node>, level: Level) -> Result<EmbeddedTarget, LoadError> {
        level.check_for(System::Kvnode)?;
        let options = match level {
            Level::Linearizable | Level::Session | Level::Serializable => {
                ReadOptions::linearizable()
            }
            Level::Lease => ReadOptions::lease(),
            Level::Bounded(bound) => ReadOptions::bounded(bound),
            Level::Eventual => ReadOptions::eventual(),
        };
        Ok(EmbeddedTarget {
            node,
            level,
            options,
            session: Session::for_level(level),
        })
    }
}

impl Target for EmbeddedTarget {
    async fn get(&self, key: &[u8]) -> Result<(), OpError> {
        let options = match &self.session {
            Some(session) => session.read_options(),
            None => self.options.clone(),
        };
        match self.node.get(key, &options).await?.value {
            Some(_) => Ok(()),
            None => Err(OpError::NotFound(String::from_utf8_lossy(key).into_owned())),
        }
    }

    async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), OpError> {
        let receipt = self.node.put(key, value).await?;
        if let Some(session) = &self.session {
            session.observe(&receipt);
        }
        Ok(())
    }

    fn read_level(&self) -> Level {
        self.level
    }

    fn system(&self) -> System {
        System::Kvnode
    }
}
