//! Redis Cluster (`store.redis_cluster_nodes`): the redis crate's cluster client, which routes
//! each command by its keys' hash slot and follows `MOVED` and `ASK` (a slot migration) and
//! topology changes (a replica promoted after its primary failed) by itself.
//!
//! [`ClusterConn`] wraps [`ClusterConnection`] and implements [`ConnectionLike`], so the store's
//! commands and scripts run on it unchanged. Two things differ from one primary:
//!
//! - **Pipelines.** The cluster client sends a pipeline to one node, so every keyed command in
//!   it must hash to one slot. The store's multi-key writes already are one script over one slot
//!   ([`super::keys`]); a *read* pipeline over several partitions (queue statistics, dead
//!   letters) is refused by the client before anything is sent (`CrossSlot`), and is then sent
//!   as separate commands, concurrently, with the answers in order.
//! - **`WAIT`** confirms the writes of one connection to one node. A cluster write that a 202
//!   depends on is therefore sent in one pipeline with its `WAIT` (see
//!   [`super::Shared::invoke_confirmed`]): both go to the primary of the write's slot, on one
//!   connection, and when the client resends the pipeline after a failover, both go to the new
//!   primary together. A `WAIT` sent on its own could land on a fresh connection to a promoted
//!   replica and count replicas that never saw the write.
//!
//! A watcher asks the cluster for its nodes (`CLUSTER NODES`) every [`WATCH_EVERY`]: `/status`
//! lists the primaries in use and their replicas, and a node that was a replica and now serves
//! slots as a primary counts as a failover.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, ServerErrorKind, Value};

use super::answers::redis_error;
use super::primary::FailoverInfo;
use super::{CALL_DEADLINE, COMMAND_TIMEOUT};
use crate::store::StoreError;

/// How often the watcher reads the cluster's nodes.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A connection to a Redis Cluster (cheap to clone; clones share the node connections).
#[derive(Clone)]
pub(super) struct ClusterConn {
    conn: ClusterConnection,
}

impl ClusterConn {
    /// Connect to the cluster that `nodes` (`host:port`) belong to; answers take at most
    /// `response_timeout` per node.
    pub async fn open(nodes: &[String], response_timeout: Duration) -> Result<Self, StoreError> {
        let urls: Vec<String> = nodes.iter().map(|n| format!("redis://{n}/")).collect();
        let client = ClusterClientBuilder::new(urls)
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(response_timeout)
            // Redirections and a failover's reconnections are retried for about as long as a
            // call may take; the call's own deadline ends it first (a 503).
            .retries(12)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()?;
        match tokio::time::timeout(CALL_DEADLINE, client.get_async_connection()).await {
            Ok(Ok(conn)) => Ok(ClusterConn { conn }),
            Ok(Err(e)) => Err(redis_error(
                e.kind(),
                "cannot connect to the redis cluster",
                format!("{}: {e}", nodes.join(", ")),
            )),
            Err(_) => Err(redis_error(
                ErrorKind::Io,
                "cannot connect to the redis cluster",
                format!("{}: no answer within {CALL_DEADLINE:?}", nodes.join(", ")),
            )),
        }
    }

    /// The cluster's nodes as one node sees them.
    pub async fn topology(&self) -> Result<Topology, StoreError> {
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut self.clone())
            .await?;
        Ok(Topology::parse(&text))
    }

    /// Keep `info` up to date with the cluster's primaries, and count failovers, until the
    /// store that owns `info` is gone.
    pub fn watch(&self, info: Weak<Mutex<FailoverInfo>>, first: Topology) {
        let conn = self.clone();
        tokio::spawn(async move {
            let mut known = first;
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let Some(info) = info.upgrade() else {
                    return;
                };
                let now = match tokio::time::timeout(COMMAND_TIMEOUT, conn.topology()).await {
                    Ok(Ok(now)) => now,
                    Ok(Err(e)) => {
                        tracing::debug!("redis cluster: cannot read the nodes: {e}");
                        continue;
                    }
                    Err(_) => continue,
                };
                let promoted = now.promoted_since(&known);
                if let Ok(mut info) = info.lock() {
                    info.cluster_primaries = now.primaries.clone();
                    for addr in &promoted {
                        tracing::warn!(node = %addr, "redis cluster failover: a replica was promoted");
                        info.failover_seen();
                    }
                }
                known = now;
            }
        });
    }
}

/// The cluster's shape, from `CLUSTER NODES`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Topology {
    /// Primaries serving slots (`host:port`, sorted), each with its number of healthy replicas.
    pub primaries: Vec<(String, usize)>,
    /// Every healthy node's address and whether it is a primary.
    roles: HashMap<String, bool>,
}

impl Topology {
    /// Parse `CLUSTER NODES` output (one line per node: id, `ip:port@cport[,hostname]`, flags,
    /// primary id, ping, pong, epoch, link state, slots...).
    pub fn parse(text: &str) -> Topology {
        let mut ids: HashMap<&str, String> = HashMap::new();
        let mut serving: Vec<&str> = Vec::new();
        let mut replicas_of: HashMap<&str, usize> = HashMap::new();
        let mut roles = HashMap::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                continue;
            }
            let addr = fields[1].split(['@', ',']).next().unwrap_or_default();
            let flags: Vec<&str> = fields[2].split(',').collect();
            if flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"))
            {
                continue;
            }
            let primary = flags.contains(&"master");
            roles.insert(addr.to_string(), primary);
            ids.insert(fields[0], addr.to_string());
            if primary && fields.len() > 8 {
                serving.push(fields[0]);
            } else if flags.contains(&"slave") {
                *replicas_of.entry(fields[3]).or_default() += 1;
            }
        }
        let mut primaries: Vec<(String, usize)> = serving
            .iter()
            .filter_map(|id| {
                let addr = ids.get(id)?;
                Some((addr.clone(), replicas_of.get(id).copied().unwrap_or(0)))
            })
            .collect();
        primaries.sort();
        Topology { primaries, roles }
    }

    /// The fewest healthy replicas any primary has (`None` without primaries).
    pub fn min_replicas(&self) -> Option<usize> {
        self.primaries.iter().map(|(_, n)| *n).min()
    }

    /// Nodes that were replicas in `before` and are primaries serving slots now.
    fn promoted_since(&self, before: &Topology) -> Vec<String> {
        self.primaries
            .iter()
            .filter(|(addr, _)| before.roles.get(addr) == Some(&false))
            .map(|(addr, _)| addr.clone())
            .collect()
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match self.conn.req_packed_commands(pipeline, offset, count).await {
                // Refused by the client before sending (module docs): one command at a time.
                Err(e)
                    if e.kind() == ErrorKind::Server(ServerErrorKind::CrossSlot)
                        && offset == 0
                        && count == pipeline.len() =>
                {
                    let sends = pipeline.cmd_iter().map(|cmd| {
                        let mut conn = self.conn.clone();
                        async move { conn.req_packed_command(cmd).await }
                    });
                    futures_util::future::join_all(sends)
                        .await
                        .into_iter()
                        .collect()
                }
                other => other,
            }
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383
b1 127.0.0.1:7004@17004 slave a1 0 0 1 connected
b2 127.0.0.1:7005@17005 slave a2 0 0 2 connected
b3 127.0.0.1:7006@17006 slave a3 0 0 3 connected
c3 127.0.0.1:7007@17007 slave a3 0 0 3 connected
";

    #[test]
    fn cluster_nodes_are_read_with_their_replicas() {
        let t = Topology::parse(NODES);
        assert_eq!(
            t.primaries,
            vec![
                ("127.0.0.1:7001".to_string(), 1),
                ("127.0.0.1:7002".to_string(), 1),
                ("127.0.0.1:7003".to_string(), 2),
            ]
        );
        assert_eq!(t.min_replicas(), Some(1));
    }

    #[test]
    fn a_promoted_replica_is_a_failover_and_failed_nodes_do_not_count() {
        let before = Topology::parse(NODES);
        let after = Topology::parse(
            "\
a1 127.0.0.1:7001@17001 master,fail - 0 0 1 disconnected
a2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383
b1 127.0.0.1:7004@17004 myself,master - 0 0 4 connected 0-5460
b2 127.0.0.1:7005@17005 slave a2 0 0 2 connected
b3 127.0.0.1:7006@17006 slave a3 0 0 3 connected
",
        );
        assert_eq!(after.promoted_since(&before), vec!["127.0.0.1:7004"]);
        assert_eq!(after.min_replicas(), Some(0));
        assert!(before.promoted_since(&before).is_empty());
    }
}
