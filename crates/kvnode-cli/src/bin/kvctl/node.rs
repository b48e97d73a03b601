//! `kvctl node ...`: the cluster's nodes (issue 17). `list` prints the node list of the map
//! the answering node knows; `add ADDR` registers a node ahead of its `kvnode --join` and
//! prints its id. The other calls that change membership join them as they land.

use clap::Subcommand;
use kvnode::client::{Client, NodeList};

/// `kvctl node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// One row per node: id, address, state, placement key, replicas held, replicas being
    /// added, and the map epoch at which it entered its state.
    List,
    /// Registers a node at ADDR (host:port) before it starts and prints its id: the node later
    /// started with `kvnode --join` and `--listen ADDR` gets this id. Idempotent while the
    /// node is Joining.
    Add {
        /// The new node's client and peer address.
        addr: String,
    },
}

pub async fn run(client: &Client, command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::List => print!("{}", table(&client.list_nodes().await?)),
        NodeCommand::Add { addr } => println!("{}", client.add_node(&addr).await?),
    }
    Ok(())
}

/// The node list as a table, headed by the map it came from.
fn table(list: &NodeList) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "ADDRESS".into(),
        "STATE".into(),
        "PLACEMENT".into(),
        "REPLICAS".into(),
        "INCOMING".into(),
        "SINCE EPOCH".into(),
    ]];
    for n in &list.nodes {
        rows.push([
            n.id.to_string(),
            n.addr.clone(),
            n.state.to_string(),
            n.placement_key.to_string(),
            n.replicas.to_string(),
            n.incoming.to_string(),
            n.since_epoch.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "cluster {:?}, map epoch {} (as node {} knows it)\n",
        list.cluster_name, list.epoch, list.answered_by
    );
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use kvnode::client::NodeSummary;
    use kvnode::cluster::membership::NodeState;

    use super::*;

    #[test]
    fn the_table_has_a_header_and_one_aligned_row_per_node() {
        let node = |id: u64, state| NodeSummary {
            id,
            addr: format!("127.0.0.1:70{id:02}"),
            state,
            placement_key: id,
            since_epoch: 1,
            replicas: 17,
            incoming: 0,
        };
        let list = NodeList {
            answered_by: 2,
            epoch: 9,
            cluster_name: "kvnode".into(),
            nodes: vec![
                node(1, NodeState::Active),
                node(12, NodeState::Draining { dead: true }),
            ],
        };
        let text = table(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "cluster \"kvnode\", map epoch 9 (as node 2 knows it)"
        );
        assert!(lines[1].starts_with("ID  ADDRESS"));
        assert!(lines[3].contains("Draining (dead)"));
        // Columns line up: every row's address starts where the header's does.
        let col = lines[1].find("ADDRESS").unwrap();
        assert_eq!(&lines[2][col..col + 9], "127.0.0.1");
        assert_eq!(&lines[3][col..col + 9], "127.0.0.1");
        assert_eq!(lines.len(), 4);
    }
}
