//! The embedded target of the load generator: a [`Node`] in this process, called directly (no
//! network, no client), so the same closed loop that measures a cluster measures the library
//! itself (`benches/embedded_throughput.rs`).

use std::sync::{Arc, Mutex};

use ::kvnode::Node;
use ::kvnode::consistency::{ReadOptions, SessionToken};

use super::{Level, LoadError, OpError, System, Target};

/// A [`Node`] of this process under load; reads at one [`Level`].
#[derive(Debug)]
pub struct EmbeddedTarget {
    node: Arc<Node>,
    level: Level,
    options: ReadOptions,
    /// The load generator's session (session reads only): every acknowledged write is observed
    /// into it, and every read carries it.
    session: Option<Mutex<SessionToken>>,
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
            session: (level == Level::Session).then(|| Mutex::new(SessionToken::new())),
        })
    }
}

impl Target for EmbeddedTarget {
    fn system(&self) -> System {
        System::Kvnode
    }

    fn read_level(&self) -> Level {
        self.level
    }

    async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), OpError> {
        let receipt = self.node.put(key, value).await?;
        if let Some(token) = &self.session {
            token
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .observe_write(&receipt);
        }
        Ok(())
    }

    async fn get(&self, key: &[u8]) -> Result<(), OpError> {
        let options = match &self.session {
            Some(token) => ReadOptions::session(
                &token
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
            None => self.options.clone(),
        };
        match self.node.get(key, &options).await?.value {
            Some(_) => Ok(()),
            None => Err(OpError::NotFound(String::from_utf8_lossy(key).into_owned())),
        }
    }
}
