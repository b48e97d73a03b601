//! How the Jepsen harness cuts the links between real `kvnode` processes on one box
//! (`docs/design/jepsen.md` §7): the addresses each node listens on and the `--peers` map
//! each one gets, and the two ways a directed link is cut, [`NetKind::Netns`] (iptables DROP
//! rules in a private network namespace, as Jepsen does) and [`NetKind::Proxy`] (an
//! unprivileged blackholing TCP proxy per directed link).
//!
//! Clients always connect to a node's [`Net::listen_addr`] directly: only peer links are cut.

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

/// The environment variable the harness sets (to `"1"`) in the process it re-executes under
/// `unshare -n`, so that the child knows it owns a private network namespace.
pub const NETNS_ENV: &str = "KVNODE_JEPSEN_NETNS";

/// First octet offset of the loopback aliases in netns mode: node `i` is `127.0.0.(10 + i)`.
const NETNS_IP_OFFSET: u64 = 10;
/// Largest node id usable in netns mode (`127.0.0.254`).
const NETNS_MAX_NODE: u64 = 244;
/// Largest node id usable in proxy mode (proxy ports are `base + 100 + 10 i + j`).
const PROXY_MAX_NODE: u64 = 9;
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
    /// A proxy listener could not bind its port.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error from `bind`.
        source: io::Error,
    },
    /// The node ids or base port do not fit this kind of network.
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
/// Dropping it stops every proxy task (and closes every proxied connection). Netns rules
/// are not removed on drop: they die with the namespace; call [`Net::heal`] to clear them.
#[derive(Debug)]
pub struct Net {
    kind: NetKind,
    nodes: BTreeSet<u64>,
    base_port: u16,
    /// Proxy mode: the cut flag of each directed link (`true` = blackholed).
    links: BTreeMap<(u64, u64), watch::Sender<bool>>,
    /// Proxy mode: one acceptor task per link; each owns its connections' tasks.
    tasks: Vec<AbortHandle>,
    /// The cuts in force; the lock also serializes changes.
    cuts: Mutex<BTreeSet<(u64, u64)>>,
}

impl Net {
    /// Sets up the network of a cluster of `nodes` (ids `1..=n`), using ports from
    /// `base_port`.
    ///
    /// - Netns: node `i` listens on `127.0.0.(10+i):base_port` (the same port, distinct IPs;
    ///   all of 127/8 routes over `lo`, so no `ip addr add` is needed). The caller has already
    ///   entered a private network namespace ([`in_private_netns`], else
    ///   [`NetError::NotInPrivateNetns`]); this runs `ip link set lo up`, checks that
    ///   `iptables -w -L -n` works, and flushes `INPUT`. Node ids up to 244.
    /// - Proxy: node `i` listens on `127.0.0.1:(base_port + i)`; for every ordered pair
    ///   `(i, j)`, `i != j`, a TCP proxy listens on `127.0.0.1:(base_port + 100 + 10 i + j)`
    ///   and forwards to node `j`, and node `i`'s `--peers` entry for `j` points at it. Node
    ///   ids up to 9. Must be called inside a tokio runtime (it spawns the proxies).
    pub async fn new(kind: NetKind, nodes: &[u64], base_port: u16) -> Result<Net, NetError> {
        let layout = |problem: String| NetError::Layout { kind, problem };
        let node_set: BTreeSet<u64> = nodes.iter().copied().collect();
        if node_set.is_empty() {
            return Err(layout("no nodes".into()));
        }
        if base_port == 0 {
            return Err(layout("base port 0 is not a port".into()));
        }
        let max = match kind {
            NetKind::Netns => NETNS_MAX_NODE,
            NetKind::Proxy => PROXY_MAX_NODE,
        };
        if let Some(bad) = node_set.iter().find(|n| **n == 0 || **n > max) {
            return Err(layout(format!("node id {bad} is not in 1..={max}")));
        }
        let mut net = Net {
            kind,
            nodes: node_set,
            base_port,
            links: BTreeMap::new(),
            tasks: Vec::new(),
            cuts: Mutex::new(BTreeSet::new()),
        };
        match kind {
            NetKind::Netns => {
                if !in_private_netns() {
                    return Err(NetError::NotInPrivateNetns);
                }
                run(&["ip", "link", "set", "lo", "up"]).await?;
                run(&["iptables", "-w", "-L", "-n"]).await?;
                net.heal().await?;
            }
            NetKind::Proxy => {
                if base_port.checked_add(199).is_none() {
                    return Err(layout(format!(
                        "base port {base_port} leaves no room for the proxy ports \
                         (base + 100 ..= base + 199)"
                    )));
                }
                let pairs: Vec<(u64, u64)> = net
                    .nodes
                    .iter()
                    .flat_map(|&i| net.nodes.iter().map(move |&j| (i, j)))
                    .filter(|(i, j)| i != j)
                    .collect();
                for (i, j) in pairs {
                    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), net.proxy_port(i, j));
                    let listener = TcpListener::bind(addr)
                        .await
                        .map_err(|source| NetError::Bind { addr, source })?;
                    let (cut_tx, cut_rx) = watch::channel(false);
                    let target = net.listen_addr(j);
                    let task = tokio::spawn(accept_loop(listener, target, cut_rx));
                    net.links.insert((i, j), cut_tx);
                    net.tasks.push(task.abort_handle());
                }
            }
        }
        Ok(net)
    }

    /// How links are cut.
    pub fn kind(&self) -> NetKind {
        self.kind
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
        match self.kind {
            NetKind::Netns => SocketAddr::new(netns_ip(node), self.base_port),
            // Fits: new() checked node <= 9 and base + 199 <= u16::MAX.
            NetKind::Proxy => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.base_port + node as u16)
            }
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
                let addr = match self.kind {
                    NetKind::Proxy if j != node => {
                        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.proxy_port(node, j))
                    }
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
        match self.kind {
            NetKind::Netns => Some(netns_ip(node)),
            NetKind::Proxy => None,
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
        match self.kind {
            NetKind::Netns => {
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
            NetKind::Proxy => {
                for (link, flag) in &self.links {
                    flag.send_replace(cuts.contains(link));
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
    /// addresses stay valid; nothing is forwarded any more.
    pub fn shutdown(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }

    /// One line for the report, e.g. `netns+iptables: private network namespace, per-pair
    /// DROP on INPUT between 127.0.0.11-13, port 7000`.
    pub fn describe(&self) -> String {
        let first = *self
            .nodes
            .first()
            .expect("new() refuses an empty node list");
        let last = *self.nodes.last().expect("new() refuses an empty node list");
        match self.kind {
            NetKind::Netns => format!(
                "{}: private network namespace, per-pair DROP on INPUT between 127.0.0.{}-{}, \
                 port {}",
                self.kind,
                NETNS_IP_OFFSET + first,
                NETNS_IP_OFFSET + last,
                self.base_port
            ),
            NetKind::Proxy => format!(
                "{}: nodes on 127.0.0.1:{}-{}, a blackholing proxy per directed link on \
                 127.0.0.1:{}-{}; a one-way cut stops the whole connection (requests and \
                 responses share it)",
                self.kind,
                self.listen_addr(first).port(),
                self.listen_addr(last).port(),
                self.base_port + 100,
                self.base_port + 199,
            ),
        }
    }

    /// The proxy port of link `from → to` (proxy mode; both ids checked by `new`).
    fn proxy_port(&self, from: u64, to: u64) -> u16 {
        self.base_port + 100 + 10 * from as u16 + to as u16
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

    /// A proxy network of nodes 1..=3 with an echo server standing in for each node, on free
    /// ports (tests run in parallel, so each tries ports until everything binds).
    async fn proxy_net() -> Net {
        loopback_up().await;
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64;
        for attempt in 0..50u64 {
            let base = 20_000 + ((seed.wrapping_mul(7919) + attempt * 1237) % 4000) as u16 * 10;
            let Ok(net) = Net::new(NetKind::Proxy, &[1, 2, 3], base).await else {
                continue;
            };
            let mut ok = true;
            for node in [1, 2, 3] {
                ok &= echo_server(net.listen_addr(node)).await.is_ok();
            }
            if ok {
                return net;
            }
        }
        panic!("no free ports for the proxy test");
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
        loopback_up().await;
        let net = proxy_net().await;
        let base = net.listen_addr(1).port() - 1;
        assert_eq!(net.kind(), NetKind::Proxy);
        assert_eq!(net.source_ip(2), None);
        let peers = net.peers_for(2);
        assert_eq!(peers[&2], format!("127.0.0.1:{}", base + 2));
        assert_eq!(peers[&1], format!("127.0.0.1:{}", base + 100 + 21));
        assert_eq!(peers[&3], format!("127.0.0.1:{}", base + 100 + 23));
        assert!(net.describe().starts_with("tcp-proxy: "));
        for bad in [(1, 1), (1, 4), (0, 2)] {
            let err = net.cut(&set(&[bad])).await.unwrap_err();
            assert!(matches!(err, NetError::BadCut { .. }), "{err}");
        }
        assert!(matches!(
            Net::new(NetKind::Proxy, &[1, 10], 30_000).await,
            Err(NetError::Layout { .. })
        ));
        assert!(matches!(
            Net::new(NetKind::Proxy, &[1, 2], 65_400).await,
            Err(NetError::Layout { .. })
        ));
        assert!(matches!(
            Net::new(NetKind::Proxy, &[], 30_000).await,
            Err(NetError::Layout { .. })
        ));
        if !in_private_netns() {
            assert!(matches!(
                Net::new(NetKind::Netns, &[1, 2], 7000).await,
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
                "skipped: run under `unshare -n env {NETNS_ENV}=1 cargo test --lib jepsen::net`"
            );
            return;
        }
        let net = Net::new(NetKind::Netns, &[1, 2, 3], 7000).await.unwrap();
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
