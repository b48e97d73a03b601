//! How the Jepsen harness cuts the links between real `kvnode` processes on one box
//! (`docs/design/jepsen.md` §7): the addresses each node listens on and the `--peers` map
//! each one gets, and the two ways a directed link is cut, [`NetKind::Netns`] (iptables DROP
//! rules in a private network namespace, as Jepsen does) and [`NetKind::Proxy`] (an
//! unprivileged blackholing TCP proxy per directed link).
//!
//! Clients always connect to a node's [`Net::listen_addr`] directly: only peer links are cut.
//!
//! **Ports.** A proxy-mode run shares the host's loopback with everything else on the machine
//! (other runs, tests running in parallel), so it uses no fixed port range: the kernel picks
//! every port. Each node's listen port is held by a [`PortReservation`] for the [`Net`]'s
//! lifetime (the node binds the same port; a node restarted after a kill finds it free again,
//! and nobody else can take it in between), and each link's proxy listens on `127.0.0.1:0`
//! (the harness's own listener, so it simply keeps the port it got). In netns mode every node
//! listens on one fixed port, [`NETNS_DEFAULT_PORT`] unless the caller picks another, on its
//! own loopback alias: the namespace is the run's own, so nothing else can hold that port.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::{AbortHandle, JoinSet};

use kvnode_testkit::ports::PortReservation;
use kvnode_testkit::processes::NodeSpec;

/// The environment variable the harness sets (to `"1"`) in the process it re-executes under
/// `unshare -n`, so that the child knows it owns a private network namespace.
pub const NETNS_ENV: &str = "KVNODE_JEPSEN_NETNS";

/// First octet offset of the loopback aliases in netns mode: node `i` is `127.0.0.(10 + i)`.
const NETNS_IP_OFFSET: u64 = 10;
/// Largest node id usable in netns mode (`127.0.0.254`).
const NETNS_MAX_NODE: u64 = 244;
/// The port every node listens on in netns mode when the caller picks none.
pub const NETNS_DEFAULT_PORT: u16 = 17400;
/// Bytes a proxy moves per read.
const PROXY_CHUNK: usize = 16 * 1024;

/// How links are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetKind {
    /// iptables DROP rules on `INPUT`, per directed pair of loopback aliases, inside a private
    /// network namespace (needs root; see [`netns_available`]). Faithful: a cut drops packets,
    /// TCP retransmits, and one-way cuts are exact.
    Netns,
    /// A TCP proxy per directed link that blackholes when cut (unprivileged). One-way cuts are
    /// approximate: see [`Net::cut`].
    Proxy,
}

impl fmt::Display for NetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetKind::Netns => "netns+iptables",
            NetKind::Proxy => "tcp-proxy",
        })
    }
}

/// Why setting up or changing the network failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command (`ip`, `iptables`) ran and exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// A command could not be started (not installed, not on `PATH`, ...).
    #[error("cannot run `{cmd}`: {source}")]
    Io {
        /// The command line.
        cmd: String,
        /// The error from spawning it.
        source: io::Error,
    },
    /// A proxy listener could not bind a port (or tell which one it got).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for (`127.0.0.1:0`).
        addr: SocketAddr,
        /// The error from `bind` or `local_addr`.
        source: io::Error,
    },
    /// No loopback port could be reserved for a node (proxy mode).
    #[error("cannot reserve a loopback port for node {node}: {source}")]
    Reserve {
        /// The node.
        node: u64,
        /// The error from reserving it.
        source: io::Error,
    },
    /// The node ids or the port do not fit this kind of network.
    #[error("{kind}: {problem}")]
    Layout {
        /// The network kind.
        kind: NetKind,
        /// What does not fit.
        problem: String,
    },
    /// A cut names a node the network does not have, or a node and itself.
    #[error("cannot cut ({from}, {to}): {problem}")]
    BadCut {
        /// The sending node.
        from: u64,
        /// The receiving node.
        to: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// Netns mode was asked for outside the private namespace the harness makes; its
    /// `iptables -F INPUT` would change the host's firewall.
    #[error(
        "netns+iptables needs the private network namespace the harness makes ({NETNS_ENV}=1 \
         under `unshare -n`); refusing to change this namespace's firewall"
    )]
    NotInPrivateNetns,
}

/// The network of a test cluster: addresses, and the cuts currently in force.
///
/// Dropping it stops every proxy task (and closes every proxied connection) and gives the
/// nodes' reserved ports back. Netns rules are not removed on drop: they die with the
/// namespace; call [`Net::heal`] to clear them.
#[derive(Debug)]
pub struct Net {
    nodes: BTreeSet<u64>,
    layout: Layout,
    /// The cuts in force; the lock also serializes changes.
    cuts: Mutex<BTreeSet<(u64, u64)>>,
}

/// Where the nodes listen and how their links run, per [`NetKind`].
#[derive(Debug)]
enum Layout {
    /// Node `i` listens on `127.0.0.(10+i):port`.
    Netns { port: u16 },
    /// Nodes and proxies on kernel-chosen loopback ports (see the module doc).
    Proxy {
        /// Each node's listen port, held until the `Net` is dropped, so that a node killed
        /// and restarted binds it again and no other process takes it in between.
        nodes: BTreeMap<u64, PortReservation>,
        /// The proxy of each directed link `(from, to)`.
        links: BTreeMap<(u64, u64), Link>,
    },
}

/// One directed link's proxy (proxy mode).
#[derive(Debug)]
struct Link {
    /// Where it listens: the `from` node's `--peers` entry for `to`.
    addr: SocketAddr,
    /// Its cut flag (`true` = blackholed).
    cut: watch::Sender<bool>,
    /// Its acceptor task, which owns its connections' tasks.
    task: AbortHandle,
}

impl Net {
    /// Sets up the network of a cluster of `nodes` (ids `1..=n`).
    ///
    /// - Netns: node `i` listens on `127.0.0.(10+i):port`, where `port` is `base_port`, or
    ///   [`NETNS_DEFAULT_PORT`] if `None` (the same port, distinct IPs; all of 127/8 routes
    ///   over `lo`, so no `ip addr add` is needed). The caller has already entered a private
    ///   network namespace ([`in_private_netns`], else [`NetError::NotInPrivateNetns`]); this
    ///   runs `ip link set lo up`, checks that `iptables -w -L -n` works, and flushes `INPUT`.
    ///   Node ids up to 244.
    /// - Proxy: `base_port` must be `None`: the kernel picks every port (see the module doc).
    ///   Node `i` listens on a reserved `127.0.0.1` port; for every ordered pair `(i, j)`,
    ///   `i != j`, a TCP proxy listens on a port of its own and forwards to node `j`, and node
    ///   `i`'s `--peers` entry for `j` points at it. Must be called inside a tokio runtime (it
    ///   spawns the proxies).
    pub async fn new(
        kind: NetKind,
        nodes: &[u64],
        base_port: Option<u16>,
    ) -> Result<Net, NetError> {
        let layout_error = |problem: String| NetError::Layout { kind, problem };
        let node_set: BTreeSet<u64> = nodes.iter().copied().collect();
        if node_set.is_empty() {
            return Err(layout_error("no nodes".into()));
        }
        // Netns: the id is the last octet of the node's alias, less 10. Proxy: any id but 0
        // (kernel-chosen ports leave no other limit).
        let (max, range) = match kind {
            NetKind::Netns => (NETNS_MAX_NODE, format!("1..={NETNS_MAX_NODE}")),
            NetKind::Proxy => (u64::MAX, "1..".to_string()),
        };
        if let Some(bad) = node_set.iter().find(|n| **n == 0 || **n > max) {
            return Err(layout_error(format!("node id {bad} is not in {range}")));
        }
        let layout = match kind {
            NetKind::Netns => {
                let port = base_port.unwrap_or(NETNS_DEFAULT_PORT);
                if port == 0 {
                    return Err(layout_error("port 0 is not a port".into()));
                }
                if !in_private_netns() {
                    return Err(NetError::NotInPrivateNetns);
                }
                run(&["ip", "link", "set", "lo", "up"]).await?;
                run(&["iptables", "-w", "-L", "-n"]).await?;
                Layout::Netns { port }
            }
            NetKind::Proxy => {
                if let Some(port) = base_port {
                    return Err(layout_error(format!(
                        "the proxy takes every port from the kernel; a fixed port ({port}) is \
                         for netns mode only"
                    )));
                }
                proxy_layout(&node_set).await?
            }
        };
        let net = Net {
            nodes: node_set,
            layout,
            cuts: Mutex::new(BTreeSet::new()),
        };
        if kind == NetKind::Netns {
            net.heal().await?;
        }
        Ok(net)
    }

    /// How links are cut.
    pub fn kind(&self) -> NetKind {
        match self.layout {
            Layout::Netns { .. } => NetKind::Netns,
            Layout::Proxy { .. } => NetKind::Proxy,
        }
    }

    /// The node ids.
    pub fn nodes(&self) -> impl Iterator<Item = u64> + '_ {
        self.nodes.iter().copied()
    }

    /// Where `node` listens: clients connect here directly (never cut).
    ///
    /// # Panics
    /// If `node` was not given to [`Net::new`].
    pub fn listen_addr(&self, node: u64) -> SocketAddr {
        self.check_node(node);
        match &self.layout {
            Layout::Netns { port } => SocketAddr::new(netns_ip(node), *port),
            Layout::Proxy { nodes, .. } => nodes[&node].addr(),
        }
    }

    /// The `--peers` map to give `node`: its own entry is its listen address; in proxy mode
    /// the entry for every other node `j` is the proxy of link `node → j`.
    ///
    /// # Panics
    /// If `node` was not given to [`Net::new`].
    pub fn peers_for(&self, node: u64) -> BTreeMap<u64, String> {
        self.check_node(node);
        self.nodes
            .iter()
            .map(|&j| {
                let addr = match &self.layout {
                    Layout::Proxy { links, .. } if j != node => links[&(node, j)].addr,
                    _ => self.listen_addr(j),
                };
                (j, addr.to_string())
            })
            .collect()
    }

    /// The address to pass `node` as `--peer-source-ip`: in netns mode its own loopback alias
    /// (`127.0.0.(10+i)`), so that per-pair rules can match its traffic; `None` in proxy mode.
    ///
    /// # Panics
    /// If `node` was not given to [`Net::new`].
    pub fn source_ip(&self, node: u64) -> Option<IpAddr> {
        self.check_node(node);
        match self.layout {
            Layout::Netns { .. } => Some(netns_ip(node)),
            Layout::Proxy { .. } => None,
        }
    }

    /// How `node` starts on this network, with its data directory and log under `run_dir`
    /// (`data/node-N/`, `logs/node-N.log`).
    ///
    /// # Panics
    /// If `node` was not given to [`Net::new`].
    pub fn node_spec(&self, node: u64, run_dir: &Path) -> NodeSpec {
        NodeSpec {
            id: node,
            listen: self.listen_addr(node),
            peers: self.peers_for(node),
            source_ip: self.source_ip(node),
            data_dir: run_dir.join("data").join(format!("node-{node}")),
            log: run_dir.join("logs").join(format!("node-{node}.log")),
        }
    }

    /// Replaces the current cuts: every `(from, to)` in `cuts` drops the traffic `from` sends
    /// to `to`; every other link is healed. A symmetric partition lists both directions.
    ///
    /// - Netns: flushes `INPUT`, then adds `iptables -w -A INPUT -s <ip(from)> -d <ip(to)> -j
    ///   DROP` per pair (Jepsen's rule: drop on the receiver's input). Exact, including
    ///   one-way cuts. Between the flush and the last rule the old cuts are briefly lifted.
    /// - Proxy: the proxy of link `from → to` blackholes. On its existing connections it stops
    ///   reading in both directions (sockets stay open; TCP backpressure stalls the senders, as
    ///   with a DROP; the proxy buffers at most one chunk per direction, which is delivered on
    ///   heal like a retransmission would be). New connections are accepted but not dialed
    ///   until the link heals. **Approximation:** a connection carries requests one way and
    ///   their responses the other. Under iptables a one-way cut `from → to` drops only what
    ///   `from` sends, so `to` hears nothing from `from` on any connection, while `from` still
    ///   hears `to`. Here the proxy of link `from → to` stops `from`'s connection to `to` in
    ///   both directions (`from` also gets no responses on it), and the connection `to` opened
    ///   to `from` (link `to → from`) keeps working both ways (`to` still gets `from`'s
    ///   responses). Use netns mode where the difference matters.
    pub async fn cut(&self, cuts: &BTreeSet<(u64, u64)>) -> Result<(), NetError> {
        for &(from, to) in cuts {
            let problem = if from == to {
                Some("a node cannot be cut from itself".to_string())
            } else {
                [from, to]
                    .into_iter()
                    .find(|n| !self.nodes.contains(n))
                    .map(|n| format!("node {n} is not in this network"))
            };
            if let Some(problem) = problem {
                return Err(NetError::BadCut { from, to, problem });
            }
        }
        let mut current = self.cuts.lock().await;
        match &self.layout {
            Layout::Netns { .. } => {
                // Forget the old cuts first: if a command fails half way, the state is unknown
                // and the next cut or heal starts with a flush anyway.
                current.clear();
                run(&["iptables", "-w", "-F", "INPUT"]).await?;
                for &(from, to) in cuts {
                    let (src, dst) = (netns_ip(from).to_string(), netns_ip(to).to_string());
                    run(&[
                        "iptables", "-w", "-A", "INPUT", "-s", &src, "-d", &dst, "-j", "DROP",
                    ])
                    .await?;
                }
            }
            Layout::Proxy { links, .. } => {
                for (pair, link) in links {
                    link.cut.send_replace(cuts.contains(pair));
                }
            }
        }
        *current = cuts.clone();
        Ok(())
    }

    /// Lifts every cut.
    pub async fn heal(&self) -> Result<(), NetError> {
        self.cut(&BTreeSet::new()).await
    }

    /// The cuts in force (as last set by [`Net::cut`]).
    pub async fn cuts(&self) -> BTreeSet<(u64, u64)> {
        self.cuts.lock().await.clone()
    }

    /// Stops every proxy task and closes every proxied connection (also done on drop). The
    /// addresses stay valid (the nodes' ports stay reserved); nothing is forwarded any more.
    pub fn shutdown(&mut self) {
        if let Layout::Proxy { links, .. } = &self.layout {
            for link in links.values() {
                link.task.abort();
            }
        }
    }

    /// One line for the report, saying where everything listens, e.g. `netns+iptables:
    /// private network namespace, per-pair DROP on INPUT between 127.0.0.11-13, port 17400`,
    /// or `tcp-proxy: nodes on 127.0.0.1 ports 1:41003 2:38211 3:40877, a blackholing proxy
    /// per directed link on 127.0.0.1 ports 1→2:35122 1→3:…; …` (proxy ports are the
    /// kernel's choice, so they are listed one by one).
    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::Netns { port } => {
                let first = *self
                    .nodes
                    .first()
                    .expect("new() refuses an empty node list");
                let last = *self.nodes.last().expect("new() refuses an empty node list");
                format!(
                    "{}: private network namespace, per-pair DROP on INPUT between \
                     127.0.0.{}-{}, port {port}",
                    self.kind(),
                    NETNS_IP_OFFSET + first,
                    NETNS_IP_OFFSET + last,
                )
            }
            Layout::Proxy { nodes, links } => {
                let nodes: Vec<String> = nodes
                    .iter()
                    .map(|(node, port)| format!("{node}:{}", port.addr().port()))
                    .collect();
                let links: Vec<String> = links
                    .iter()
                    .map(|((from, to), link)| format!("{from}→{to}:{}", link.addr.port()))
                    .collect();
                format!(
                    "{}: nodes on 127.0.0.1 ports {}, a blackholing proxy per directed link on \
                     127.0.0.1 ports {}; a one-way cut stops the whole connection (requests \
                     and responses share it)",
                    self.kind(),
                    nodes.join(" "),
                    links.join(" "),
                )
            }
        }
    }

    fn check_node(&self, node: u64) {
        assert!(
            self.nodes.contains(&node),
            "node {node} is not in this network ({:?})",
            self.nodes
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// True if this process can use [`NetKind::Netns`] after re-executing itself under
/// `unshare -n`: its effective uid is 0, it holds `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`
/// (a root without them, as in some containers, cannot make a namespace), and `unshare`,
/// `ip` and `iptables` are on `PATH`.
pub fn netns_available() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let euid_is_root = field("Uid:")
        .and_then(|v| v.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0");
    let caps = field("CapEff:").and_then(|v| u64::from_str_radix(v, 16).ok());
    let has_caps =
        caps.is_some_and(|c| c & (1 << CAP_NET_ADMIN) != 0 && c & (1 << CAP_SYS_ADMIN) != 0);
    euid_is_root && has_caps && ["unshare", "ip", "iptables"].iter().all(|p| on_path(p))
}

/// True if this process is already inside the private namespace the harness made: the
/// environment variable [`NETNS_ENV`] is `"1"`.
pub fn in_private_netns() -> bool {
    std::env::var_os(NETNS_ENV).is_some_and(|v| v == "1")
}

/// True if an executable file `program` is in a directory of `PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let candidate: &Path = &dir.join(program);
        candidate
            .metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Proxy mode's layout: a reserved port per node, then a proxy per directed link, on a port
/// the kernel picks, forwarding to the node it leads to (see the module doc). Every listener
/// is bound before any proxy task is spawned, so a failure leaves no task behind.
async fn proxy_layout(nodes: &BTreeSet<u64>) -> Result<Layout, NetError> {
    let ports = nodes
        .iter()
        .map(|&node| {
            PortReservation::new()
                .map(|port| (node, port))
                .map_err(|source| NetError::Reserve { node, source })
        })
        .collect::<Result<BTreeMap<u64, PortReservation>, NetError>>()?;
    let any = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0);
    let bind_error = |source| NetError::Bind { addr: any, source };
    let mut listeners = Vec::new();
    for &from in nodes {
        for &to in nodes.iter().filter(|&&to| to != from) {
            let listener = TcpListener::bind(any).await.map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            listeners.push(((from, to), listener, addr));
        }
    }
    let links = listeners
        .into_iter()
        .map(|((from, to), listener, addr)| {
            let (cut, cut_rx) = watch::channel(false);
            let task = tokio::spawn(accept_loop(listener, ports[&to].addr(), cut_rx));
            let link = Link {
                addr,
                cut,
                task: task.abort_handle(),
            };
            ((from, to), link)
        })
        .collect();
    Ok(Layout::Proxy {
        nodes: ports,
        links,
    })
}

/// Node `node`'s loopback alias in netns mode.
fn netns_ip(node: u64) -> IpAddr {
    let last = u8::try_from(NETNS_IP_OFFSET + node).expect("new() checked the node id range");
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Runs a command to completion; a non-zero exit is [`NetError::Command`].
async fn run(argv: &[&str]) -> Result<(), NetError> {
    let cmd = argv.join(" ");
    let output = tokio::process::Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| NetError::Io {
            cmd: cmd.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            cmd,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Accepts connections on one link's proxy port and forwards each to `target`. Its
/// connections' tasks live in a `JoinSet` it owns, so aborting this task stops them too.
async fn accept_loop(listener: TcpListener, target: SocketAddr, cut: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((inbound, _)) => {
                conns.spawn(proxy_conn(inbound, target, cut.clone()));
            }
            Err(e) => {
                // E.g. out of file descriptors: back off rather than spin.
                tracing::warn!(error = %e, %target, "jepsen proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One proxied connection: waits until the link is healed before dialing (a connection
/// accepted during a cut is held, like a SYN that is retransmitted), then pumps both ways.
async fn proxy_conn(inbound: TcpStream, target: SocketAddr, mut cut: watch::Receiver<bool>) {
    if cut.wait_for(|c| !*c).await.is_err() {
        return;
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        // The node is down: closing the accepted socket tells the dialer so.
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    // The first error (a reset) ends both directions; an EOF only ends its own.
    let _ = tokio::try_join!(
        pump(in_read, out_write, cut.clone()),
        pump(out_read, in_write, cut)
    );
}

/// Copies `from` to `to` while the link is not cut. When it is cut, stops reading at once
/// (an outstanding read is cancelled, which loses nothing) until the link heals. Ends at EOF
/// (passing the half-close on) or on the first error.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) -> io::Result<()> {
    let closed = || io::Error::other("proxy closed");
    let mut buf = vec![0u8; PROXY_CHUNK];
    loop {
        cut.wait_for(|c| !*c).await.map_err(|_| closed())?;
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            became_cut = cut.wait_for(|c| *c) => {
                became_cut.map_err(|_| closed())?;
                continue;
            }
        };
        if n == 0 {
            return to.shutdown().await;
        }
        // A cut that landed after the read holds this chunk until the heal.
        cut.wait_for(|c| !*c).await.map_err(|_| closed())?;
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpSocket;
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(2);
    const SILENCE: Duration = Duration::from_millis(300);

    /// Under `unshare -n` the proxy tests share a fresh namespace whose `lo` starts down.
    async fn loopback_up() {
        if in_private_netns() {
            run(&["ip", "link", "set", "lo", "up"]).await.unwrap();
        }
    }

    /// An echo server on `addr`.
    async fn echo_server(addr: SocketAddr) -> io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(())
    }

    /// A proxy network of nodes 1..=3 with an echo server standing in for each node, on the
    /// port the network reserved for it.
    async fn proxy_net() -> Net {
        loopback_up().await;
        let net = Net::new(NetKind::Proxy, &[1, 2, 3], None).await.unwrap();
        for node in [1, 2, 3] {
            echo_server(net.listen_addr(node)).await.unwrap();
        }
        net
    }

    fn proxy_addr(net: &Net, from: u64, to: u64) -> SocketAddr {
        net.peers_for(from)[&to].parse().unwrap()
    }

    /// Sends `msg` and expects it echoed back within `WAIT`.
    async fn echoes(conn: &mut TcpStream, msg: &[u8]) {
        conn.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        timeout(WAIT, conn.read_exact(&mut buf))
            .await
            .expect("no echo in time")
            .unwrap();
        assert_eq!(buf, msg);
    }

    /// Sends `msg` and expects no echo within `SILENCE`.
    async fn silent(conn: &mut TcpStream, msg: &[u8]) {
        conn.write_all(msg).await.unwrap();
        let mut buf = [0u8; 1];
        let read = timeout(SILENCE, conn.read(&mut buf)).await;
        assert!(read.is_err(), "expected a black hole, got {read:?}");
    }

    fn set(cuts: &[(u64, u64)]) -> BTreeSet<(u64, u64)> {
        cuts.iter().copied().collect()
    }

    #[tokio::test]
    async fn proxy_cut_blackholes_and_heal_resumes() {
        let net = proxy_net().await;
        let link = proxy_addr(&net, 1, 2);
        let mut old = TcpStream::connect(link).await.unwrap();
        echoes(&mut old, b"before").await;

        net.cut(&set(&[(1, 2)])).await.unwrap();
        assert_eq!(net.cuts().await, set(&[(1, 2)]));
        silent(&mut old, b"during").await;
        // A new connection is accepted but goes nowhere.
        let mut new = timeout(WAIT, TcpStream::connect(link))
            .await
            .unwrap()
            .unwrap();
        silent(&mut new, b"held").await;
        // Other links are untouched.
        let mut other = TcpStream::connect(proxy_addr(&net, 1, 3)).await.unwrap();
        echoes(&mut other, b"1->3").await;

        net.heal().await.unwrap();
        // What was sent during the cut arrives now (TCP would retransmit it), then traffic
        // flows again, on old and new connections alike.
        let mut buf = [0u8; 6];
        timeout(WAIT, old.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"during");
        echoes(&mut old, b"after").await;
        let mut held = [0u8; 4];
        timeout(WAIT, new.read_exact(&mut held))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&held, b"held");
        echoes(&mut new, b"again").await;
    }

    #[tokio::test]
    async fn a_cut_is_directed() {
        let net = proxy_net().await;
        net.cut(&set(&[(2, 1)])).await.unwrap();
        let mut forward = TcpStream::connect(proxy_addr(&net, 1, 2)).await.unwrap();
        echoes(&mut forward, b"1->2 works").await;
        let mut backward = TcpStream::connect(proxy_addr(&net, 2, 1)).await.unwrap();
        silent(&mut backward, b"2->1 cut").await;
    }

    #[tokio::test]
    async fn dropping_the_net_stops_the_proxies() {
        let net = proxy_net().await;
        let link = proxy_addr(&net, 3, 1);
        let mut conn = TcpStream::connect(link).await.unwrap();
        echoes(&mut conn, b"x").await;
        drop(net);
        // The connection is closed (EOF or reset) and the port no longer accepts.
        let mut buf = [0u8; 1];
        let read = timeout(WAIT, conn.read(&mut buf))
            .await
            .expect("still open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let reconnect = timeout(WAIT, TcpStream::connect(link)).await.unwrap();
        assert!(reconnect.is_err());
    }

    #[tokio::test]
    async fn layout_and_validation() {
        let net = proxy_net().await;
        assert_eq!(net.kind(), NetKind::Proxy);
        assert_eq!(net.source_ip(2), None);
        // Every node and every link has a loopback port of its own.
        let mut ports = BTreeSet::new();
        for node in [1, 2, 3] {
            let listen = net.listen_addr(node);
            assert_eq!(listen.ip(), Ipv4Addr::LOCALHOST);
            assert!(ports.insert(listen.port()), "{listen} used twice");
            let peers = net.peers_for(node);
            assert_eq!(peers.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
            assert_eq!(peers[&node], listen.to_string());
            for other in [1, 2, 3].into_iter().filter(|&o| o != node) {
                let link = proxy_addr(&net, node, other);
                assert_eq!(link.ip(), Ipv4Addr::LOCALHOST);
                assert!(ports.insert(link.port()), "{link} used twice");
            }
        }
        assert_eq!(ports.len(), 3 + 6);
        // The report line names every port.
        let described = net.describe();
        assert!(described.starts_with("tcp-proxy: "), "{described}");
        let node_2 = format!("2:{}", net.listen_addr(2).port());
        let link_3_1 = format!("3→1:{}", proxy_addr(&net, 3, 1).port());
        for part in [node_2, link_3_1] {
            assert!(described.contains(&part), "{part} not in {described}");
        }
        for bad in [(1, 1), (1, 4), (0, 2)] {
            let err = net.cut(&set(&[bad])).await.unwrap_err();
            assert!(matches!(err, NetError::BadCut { .. }), "{err}");
        }
        // Proxy mode: no node 0, no fixed port, any other id.
        for (nodes, port) in [(&[0, 1][..], None), (&[1, 2], Some(17_400)), (&[], None)] {
            let err = Net::new(NetKind::Proxy, nodes, port).await.unwrap_err();
            assert!(matches!(err, NetError::Layout { .. }), "{err}");
        }
        let wide = Net::new(NetKind::Proxy, &[1, 10, 300], None).await.unwrap();
        assert_eq!(wide.peers_for(300).len(), 3);
        // Netns mode: the layout is checked before the namespace.
        for (nodes, port) in [(&[1, 245][..], None), (&[1, 2], Some(0))] {
            let err = Net::new(NetKind::Netns, nodes, port).await.unwrap_err();
            assert!(matches!(err, NetError::Layout { .. }), "{err}");
        }
        if !in_private_netns() {
            assert!(matches!(
                Net::new(NetKind::Netns, &[1, 2], Some(7000)).await,
                Err(NetError::NotInPrivateNetns)
            ));
        }
        assert_eq!(NetKind::Netns.to_string(), "netns+iptables");
        assert_eq!(NetKind::Proxy.to_string(), "tcp-proxy");
        // Must not panic, whatever the machine.
        let _ = netns_available();
    }

    /// Connects from a socket bound to `from` to `to`, within `SILENCE`.
    async fn connect_from(from: IpAddr, to: SocketAddr) -> Option<TcpStream> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        timeout(SILENCE, socket.connect(to)).await.ok()?.ok()
    }

    #[tokio::test]
    async fn netns_cut_drops_one_pair() {
        if !in_private_netns() {
            eprintln!(
                "skipped: run under `unshare -n env {NETNS_ENV}=1 cargo test -p kvnode-jepsen \
                 --lib net::`"
            );
            return;
        }
        let default = Net::new(NetKind::Netns, &[1, 2], None).await.unwrap();
        assert_eq!(default.listen_addr(2), "127.0.0.12:17400".parse().unwrap());
        assert!(default.describe().ends_with(", port 17400"));
        let net = Net::new(NetKind::Netns, &[1, 2, 3], Some(7000))
            .await
            .unwrap();
        assert_eq!(net.listen_addr(1), "127.0.0.11:7000".parse().unwrap());
        assert_eq!(net.source_ip(2), Some("127.0.0.12".parse().unwrap()));
        assert_eq!(net.peers_for(3)[&1], "127.0.0.11:7000");
        assert!(net.describe().starts_with("netns+iptables: "));
        let listener = TcpListener::bind(net.listen_addr(1)).await.unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let (ip2, ip3) = (net.source_ip(2).unwrap(), net.source_ip(3).unwrap());
        let node1 = net.listen_addr(1);

        net.cut(&set(&[(2, 1)])).await.unwrap();
        assert!(
            connect_from(ip2, node1).await.is_none(),
            "2 -> 1 should be cut"
        );
        assert!(
            connect_from(ip3, node1).await.is_some(),
            "3 -> 1 should work"
        );
        net.heal().await.unwrap();
        assert!(
            connect_from(ip2, node1).await.is_some(),
            "2 -> 1 should be healed"
        );
    }
}
