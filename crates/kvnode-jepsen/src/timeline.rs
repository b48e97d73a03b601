//! The timeline picture of a fault-test run, as in a Jepsen report: every operation's latency
//! over time with the nemesis's fault windows shaded, as a standalone SVG and as an HTML page.
//!
//! ## What the picture shows
//!
//! - x: seconds since the harness started (`t_ns`); y: latency in milliseconds on a log scale,
//!   from 0.1 ms to the power of ten above the slowest completed operation, and above that a
//!   band for the operations that have no latency (`info`).
//! - One horizontal lane per `f` present (read, write, cas), all on the same scales.
//! - One marker per operation, at its invocation time: a green dot for `ok`, a red cross for
//!   `fail`. An `info` (outcome unknown, or never completed) has no latency: it is an orange
//!   triangle on the lane's top edge (the `info` band) at its invocation, with a faint bar along the edge until
//!   the client gave up (its `info` line) or, with no completion, until the history ends.
//! - Fault windows: a translucent band over every lane per window, one colour per family
//!   (partition, kill, pause, clock, apply-lag, other), labelled above the lanes with the
//!   family and a short form of the targets (`targets`, `nodes` or `grudge` in the nemesis
//!   `info`; a grudge is shown as the groups it cuts the cluster into, `1 | 2,3`). A window runs from a
//!   `start-X` to the next `stop-X` (or to the end of the history); a fault logged as `invoke`
//!   then `info` counts once, from the first start line to the last stop line. Nemesis lines
//!   that are neither a start nor a stop are thin vertical lines.
//! - Over 20,000 operations, `ok` reads are thinned evenly (the subtitle says by how much);
//!   `fail` and `info` operations, writes and CAS are always all drawn.
//!
//! ## Drawing
//!
//! The chart is drawn with `plotters`, SVG backend only (`default-features = false`): that
//! backend writes text as SVG `<text>` elements and lays labels out with plotters' built-in
//! size estimate, so axes, tick labels and the legend need neither the `ttf` feature nor any
//! system font library; the viewer (browser, `rsvg-convert`) picks the sans-serif font.
//! Coordinates are whole pixels (plotters' backend coordinates), about 100 bytes per drawn
//! operation: 2,000 operations make a ~220 KB SVG, the 20,000 cap about 2 MB.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::history::{Event, F, History, HistoryError, OpType, Output};

/// How the timeline is drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineOptions {
    /// The title above the chart.
    pub title: String,
    /// The picture's width in pixels (at least 480 is used).
    pub width: u32,
    /// The picture's height in pixels (at least 320 is used).
    pub height: u32,
}

impl Default for TimelineOptions {
    fn default() -> TimelineOptions {
        TimelineOptions {
            title: "kvnode fault test".to_string(),
            width: 1200,
            height: 640,
        }
    }
}

/// Renders the history as a standalone SVG document.
///
/// Fails only if the history does not pair ([`History::pair`]); a drawing failure, which an
/// in-memory SVG does not have, would come back as [`HistoryError::Io`] on `timeline.svg`.
pub fn timeline_svg(history: &History, options: &TimelineOptions) -> Result<String, HistoryError> {
    let model = Model::build(history)?;
    let mut svg = String::with_capacity(4096 + model.marks.len() * 100);
    render(&model, options, &mut svg).map_err(|e| HistoryError::Io {
        path: PathBuf::from("timeline.svg"),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(svg)
}

/// Writes `<dir>/timeline.svg` and `<dir>/timeline.html` (the HTML embeds the SVG inline, a
/// short legend and, if `summary` is not empty, `summary` in a `<pre>`), creating `dir` if
/// needed, and returns the two paths.
pub fn write_timeline(
    history: &History,
    options: &TimelineOptions,
    summary: &str,
    dir: &Path,
) -> io::Result<(PathBuf, PathBuf)> {
    let svg = timeline_svg(history, options).map_err(|e| match e {
        HistoryError::Io { source, .. } => source,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    })?;
    std::fs::create_dir_all(dir)?;
    let svg_path = dir.join("timeline.svg");
    let html_path = dir.join("timeline.html");
    std::fs::write(&svg_path, &svg)?;
    std::fs::write(&html_path, html_page(&options.title, &svg, summary))?;
    Ok((svg_path, html_path))
}

/// Above this many operations, `ok` reads are thinned.
const MAX_MARKS: usize = 20_000;
/// The smallest latency drawn, in ms; faster operations are drawn at it.
const Y_MIN_MS: f64 = 0.1;
/// The bottom of the latency axis: a hair under [`Y_MIN_MS`], so that plotters' log scale
/// puts a tick at 0.1 ms (it starts its ticks at the first power of ten above the bottom,
/// and `ln(0.1) / ln(10)` rounds to just above -1).
const Y_AXIS_BOTTOM: f64 = 0.0999;
/// The latency axis ends this many times above its last tick: the band above that tick is
/// where `info` operations sit, clear of any completed operation.
const INFO_HEADROOM: f64 = 5.0;

const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x66, 0x66, 0x66);
const GRID: RGBColor = RGBColor(0xe4, 0xe4, 0xe4);
const FRAME: RGBColor = RGBColor(0x99, 0x99, 0x99);
const OK_GREEN: RGBColor = RGBColor(0x1a, 0x98, 0x50);
const FAIL_RED: RGBColor = RGBColor(0xd7, 0x30, 0x27);
const INFO_ORANGE: RGBColor = RGBColor(0xe0, 0x82, 0x14);

/// Opacity of op markers and fault bands; the legend draws its samples opaque, so the two
/// never share a style (the tests count markers by style).
const OK_ALPHA: f64 = 0.55;
const FAIL_ALPHA: f64 = 0.85;
const INFO_ALPHA: f64 = 0.9;
const BAR_ALPHA: f64 = 0.3;
const WINDOW_ALPHA: f64 = 0.15;

/// How an operation ended, for colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Fail,
    Info,
}

/// One operation to draw.
#[derive(Debug, Clone, Copy)]
struct Mark {
    f: F,
    outcome: Outcome,
    invoke_ns: u64,
    /// Completion (`ok`, `fail`), or when the client gave up (`info`; the history's end if it
    /// never completed).
    done_ns: u64,
}

/// A fault family: one colour each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    Partition,
    Kill,
    Pause,
    Clock,
    ApplyLag,
    Other,
}

impl Family {
    const ALL: [Family; 6] = [
        Family::Partition,
        Family::Kill,
        Family::Pause,
        Family::Clock,
        Family::ApplyLag,
        Family::Other,
    ];

    /// The family of a fault named `name` (`partition`, `kill`, `partition-majority`, …).
    fn of(name: &str) -> Family {
        let name = name.to_ascii_lowercase();
        let has = |words: &[&str]| words.iter().any(|w| name.contains(w));
        if has(&["partition", "isolat", "grudge"]) {
            Family::Partition
        } else if has(&["kill", "crash", "restart"]) {
            Family::Kill
        } else if has(&["pause", "freeze", "stall"]) {
            Family::Pause
        } else if has(&["clock", "skew", "strobe", "ntp"]) {
            Family::Clock
        } else if has(&["apply-lag"]) {
            Family::ApplyLag
        } else {
            Family::Other
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::Partition => "partition",
            Family::Kill => "kill",
            Family::Pause => "pause",
            Family::Clock => "clock",
            Family::ApplyLag => "apply-lag",
            Family::Other => "other",
        }
    }

    fn colour(self) -> RGBColor {
        match self {
            Family::Partition => RGBColor(0x3b, 0x6f, 0xb6),
            Family::Kill => RGBColor(0x8e, 0x44, 0xad),
            Family::Pause => RGBColor(0x12, 0x83, 0x8f),
            Family::Clock => RGBColor(0xa6, 0x76, 0x1d),
            Family::ApplyLag => RGBColor(0xc2, 0x18, 0x5b),
            Family::Other => RGBColor(0x6b, 0x6b, 0x6b),
        }
    }
}

/// A fault window: from a `start-X` to the next `stop-X`.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    family: Family,
    /// `X` of `start-X`.
    name: String,
    start_ns: u64,
    /// `None` while open; open at the end of the history: runs to the end.
    end_ns: Option<u64>,
    targets: Option<String>,
    /// Started by an `invoke` line whose `info` line has not come yet.
    awaiting_start_info: bool,
    /// Stopped by an `invoke` line whose `info` line has not come yet.
    awaiting_stop_info: bool,
}

impl Window {
    fn label(&self) -> String {
        let name = match self.family {
            Family::Other => self.name.as_str(),
            family => family.name(),
        };
        match &self.targets {
            Some(t) => format!("{name} {t}"),
            None => name.to_string(),
        }
    }
}

/// A nemesis line that neither starts nor stops a fault.
#[derive(Debug, Clone, PartialEq)]
struct Instant {
    family: Family,
    t_ns: u64,
    label: String,
}

/// Everything the picture shows, in data units.
#[derive(Debug)]
struct Model {
    marks: Vec<Mark>,
    windows: Vec<Window>,
    instants: Vec<Instant>,
    /// The last timestamp in the history.
    end_ns: u64,
    /// Operations by outcome, before thinning: ok, fail, info.
    counts: [usize; 3],
    /// 1: nothing thinned; else one `ok` read in `stride` is drawn.
    stride: usize,
}

impl Model {
    fn build(history: &History) -> Result<Model, HistoryError> {
        let paired = history.pair()?;
        let end_ns = history
            .events
            .iter()
            .map(|e| match e {
                Event::Op(op) => op.t_ns,
                Event::Nemesis(n) => n.t_ns,
            })
            .max()
            .unwrap_or(0);
        let completed_at: HashMap<u64, u64> = history
            .ops()
            .filter(|op| op.kind != OpType::Invoke)
            .map(|op| (op.i, op.t_ns))
            .collect();
        let mut counts = [0; 3];
        let mut marks: Vec<Mark> = paired
            .iter()
            .map(|op| {
                let (outcome, done) = match op.output {
                    Output::Fail => (Outcome::Fail, op.complete_t),
                    Output::Info => (
                        Outcome::Info,
                        op.complete_i.and_then(|i| completed_at.get(&i).copied()),
                    ),
                    _ => (Outcome::Ok, op.complete_t),
                };
                counts[outcome as usize] += 1;
                Mark {
                    f: op.f(),
                    outcome,
                    invoke_ns: op.invoke_t,
                    done_ns: done.unwrap_or(end_ns).max(op.invoke_t),
                }
            })
            .collect();
        let mut stride = 1;
        if marks.len() > MAX_MARKS {
            let thinnable = |m: &Mark| m.f == F::Read && m.outcome == Outcome::Ok;
            let ok_reads = marks.iter().filter(|m| thinnable(m)).count();
            let room = MAX_MARKS.saturating_sub(marks.len() - ok_reads).max(1);
            stride = ok_reads.div_ceil(room).max(1);
            let mut n = 0usize;
            marks.retain(|m| {
                if !thinnable(m) {
                    return true;
                }
                n += 1;
                (n - 1).is_multiple_of(stride)
            });
        }
        let (windows, instants) = fault_windows(history);
        Ok(Model {
            marks,
            windows,
            instants,
            end_ns,
            counts,
            stride,
        })
    }

    fn end_s(&self) -> f64 {
        (self.end_ns as f64 / 1e9).max(1e-3)
    }

    fn window_end_ns(&self, w: &Window) -> u64 {
        w.end_ns.unwrap_or(self.end_ns).max(w.start_ns)
    }

    /// The top of the latency axis: the power of ten above 1.5× the slowest completion.
    fn y_top_ms(&self) -> f64 {
        let slowest = self
            .marks
            .iter()
            .filter(|m| m.outcome != Outcome::Info)
            .map(|m| (m.done_ns - m.invoke_ns) as f64 / 1e6)
            .fold(0.0f64, f64::max);
        let mut top = 10.0;
        while top < slowest * 1.5 {
            top *= 10.0;
        }
        top
    }

    /// The lanes: the `f`s present, in read, write, cas order; all three if there are none.
    fn lanes(&self) -> Vec<F> {
        let lanes: Vec<F> = [F::Read, F::Write, F::Cas]
            .into_iter()
            .filter(|f| self.marks.iter().any(|m| m.f == *f))
            .collect();
        if lanes.is_empty() {
            vec![F::Read, F::Write, F::Cas]
        } else {
            lanes
        }
    }

    fn subtitle(&self) -> String {
        let [ok, fail, info] = self.counts;
        let mut s = format!(
            "{} ops: {ok} ok, {fail} fail, {info} info · {} fault window{} · {:.1} s",
            ok + fail + info,
            self.windows.len(),
            if self.windows.len() == 1 { "" } else { "s" },
            self.end_ns as f64 / 1e9,
        );
        if self.stride > 1 {
            s.push_str(&format!(" · ok reads thinned to 1 in {}", self.stride));
        }
        s
    }
}

/// Pairs `start-X` with the next `stop-X` into windows, in start order.
fn fault_windows(history: &History) -> (Vec<Window>, Vec<Instant>) {
    let mut windows: Vec<Window> = Vec::new();
    let mut instants = Vec::new();
    for event in &history.events {
        let Event::Nemesis(n) = event else { continue };
        let invoke = n.kind == OpType::Invoke;
        if let Some(name) = n.f.strip_prefix("start-") {
            if !invoke
                && let Some(w) = windows
                    .iter_mut()
                    .rev()
                    .find(|w| w.name == name && w.awaiting_start_info)
            {
                // The completion of a start logged as invoke, then info.
                w.awaiting_start_info = false;
                if w.targets.is_none() {
                    w.targets = targets_label(&n.info);
                }
                continue;
            }
            for w in windows.iter_mut().filter(|w| w.name == name) {
                w.awaiting_stop_info = false;
            }
            windows.push(Window {
                family: Family::of(name),
                name: name.to_string(),
                start_ns: n.t_ns,
                end_ns: None,
                targets: targets_label(&n.info),
                awaiting_start_info: invoke,
                awaiting_stop_info: false,
            });
        } else if let Some(name) = n.f.strip_prefix("stop-") {
            let completes_a_stop = !invoke
                && windows
                    .iter()
                    .any(|w| w.name == name && w.awaiting_stop_info);
            for w in windows.iter_mut().filter(|w| w.name == name) {
                if completes_a_stop && w.awaiting_stop_info {
                    w.end_ns = Some(n.t_ns);
                    w.awaiting_stop_info = false;
                } else if !completes_a_stop && w.end_ns.is_none() {
                    w.end_ns = Some(n.t_ns);
                    w.awaiting_stop_info = invoke;
                }
            }
        } else {
            let label = match targets_label(&n.info) {
                Some(t) => format!("{} {t}", n.f),
                None => n.f.clone(),
            };
            instants.push(Instant {
                family: Family::of(&n.f),
                t_ns: n.t_ns,
                label: shorten(&label, 28),
            });
        }
    }
    (windows, instants)
}

/// A short form of the nemesis `info`'s targets, if it names any.
fn targets_label(info: &serde_json::Value) -> Option<String> {
    if let Some(grudge) = info.get("grudge") {
        let text = grudge
            .as_object()
            .and_then(grudge_groups)
            .unwrap_or_else(|| compact(grudge));
        return Some(shorten(&text, 24)).filter(|t| !t.is_empty());
    }
    ["targets", "nodes", "target", "node"]
        .iter()
        .find_map(|key| info.get(*key))
        .map(|v| shorten(&compact(v), 24))
        .filter(|t| !t.is_empty())
}

/// A JSON value on one short line: arrays comma-separated, objects as `k:v`.
fn compact(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(compact).collect::<Vec<_>>().join(","),
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}:{}", compact(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// A grudge (`{"1":[2,3]}`: node 1 drops traffic from 2 and 3) as the groups of nodes that
/// can still all talk to each other, `1 | 2,3`; `None` if it is not of that shape or cuts
/// nothing.
fn grudge_groups(grudge: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let mut nodes = BTreeSet::new();
    let mut cut = BTreeSet::new();
    for (from, dropped) in grudge {
        nodes.insert(from.clone());
        for to in dropped.as_array()? {
            let to = scalar(to)?;
            nodes.insert(to.clone());
            cut.insert((from.clone(), to.clone()));
            cut.insert((to, from.clone()));
        }
    }
    let mut nodes: Vec<String> = nodes.into_iter().collect();
    nodes.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    // Union-find over "not cut in either direction".
    let mut parent: Vec<usize> = (0..nodes.len()).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for a in 0..nodes.len() {
        for b in a + 1..nodes.len() {
            if !cut.contains(&(nodes[a].clone(), nodes[b].clone())) {
                let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
                parent[ra.max(rb)] = ra.min(rb);
            }
        }
    }
    let mut groups: Vec<Vec<&str>> = Vec::new();
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let r = root(&mut parent, i);
        let g = *group_of.entry(r).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(node);
    }
    (groups.len() > 1).then(|| {
        groups
            .iter()
            .map(|g| g.join(","))
            .collect::<Vec<_>>()
            .join(" | ")
    })
}

/// `s` cut to at most `max` characters, with an ellipsis if cut.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// `x` with at most three decimals and no trailing zeros.
fn trim_number(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn format_seconds(v: &f64) -> String {
    trim_number(*v)
}

fn format_latency(v: &f64) -> String {
    if *v >= 1000.0 {
        format!("{} s", trim_number(v / 1000.0))
    } else {
        format!("{} ms", trim_number(*v))
    }
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;
type Lane<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>;

/// Layout, in pixels.
const PAD: i32 = 16;
const Y_LABEL_W: i32 = 92;
const X_LABEL_H: i32 = 46;
const HEADER_H: i32 = 62;
const STRIP_ROW_H: i32 = 15;
const LANE_GAP: i32 = 14;
const LABEL_CHAR_W: f64 = 6.4;

fn font(size: f64) -> FontDesc<'static> {
    // plotters' SVG backend writes `font-size` as size / 1.24.
    ("sans-serif", size * 1.24).into_font()
}

fn text_style(size: f64, colour: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    font(size).color(&colour).pos(Pos::new(h, v))
}

fn render(model: &Model, options: &TimelineOptions, out: &mut String) -> DrawResult<()> {
    let (w, h) = (options.width.max(480), options.height.max(320));
    let root = SVGBackend::with_string(out, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (w, h) = (w as i32, h as i32);

    // Header: title, subtitle, legend.
    root.draw(&Text::new(
        options.title.clone(),
        (PAD, 12),
        font(20.0)
            .style(FontStyle::Bold)
            .color(&INK)
            .pos(Pos::new(HPos::Left, VPos::Top)),
    ))?;
    root.draw(&Text::new(
        model.subtitle(),
        (PAD, 40),
        text_style(12.5, MUTED, HPos::Left, VPos::Top),
    ))?;
    draw_legend(&root, model, w - PAD)?;

    // The fault-label strip: each label on the first row where it does not overlap.
    let plot_left = PAD + Y_LABEL_W;
    let plot_right = w - PAD;
    let x_px = |t_ns: u64| {
        let frac = (t_ns as f64 / 1e9 / model.end_s()).clamp(0.0, 1.0);
        plot_left as f64 + frac * (plot_right - plot_left) as f64
    };
    let mut rows: Vec<f64> = Vec::new(); // right end of the last label on each row
    let mut labels: Vec<(f64, usize, String, RGBColor)> = Vec::new();
    let mut label_items: Vec<(u64, String, RGBColor)> = model
        .windows
        .iter()
        .map(|w| (w.start_ns, shorten(&w.label(), 32), w.family.colour()))
        .chain(
            model
                .instants
                .iter()
                .map(|i| (i.t_ns, i.label.clone(), i.family.colour())),
        )
        .collect();
    label_items.sort_by_key(|(t, _, _)| *t);
    for (t_ns, label, colour) in label_items {
        let x = (x_px(t_ns) + 3.0)
            .min(plot_right as f64 - 40.0)
            .max(plot_left as f64 + 2.0);
        let width = label.chars().count() as f64 * LABEL_CHAR_W + 10.0;
        let row = match rows.iter().position(|&end| end <= x) {
            Some(r) => r,
            None if rows.len() < 3 => {
                rows.push(0.0);
                rows.len() - 1
            }
            None => (0..rows.len())
                .min_by(|&a, &b| rows[a].total_cmp(&rows[b]))
                .unwrap_or(0),
        };
        rows[row] = x + width;
        labels.push((x, row, label, colour));
    }
    let strip_top = HEADER_H;
    let lanes_top = strip_top + rows.len().max(1) as i32 * STRIP_ROW_H + 4;

    // The lanes.
    let lane_fs = model.lanes();
    let n = lane_fs.len() as i32;
    let lanes_bottom = h - 8;
    let plot_h = ((lanes_bottom - lanes_top - X_LABEL_H - LANE_GAP * (n - 1)) / n).max(40);
    let y_top = model.y_top_ms();
    let y_edge = y_top * INFO_HEADROOM;
    let x_range = 0f64..model.end_s();
    let mut charts: Vec<Lane> = Vec::new();
    for (k, f) in lane_fs.iter().enumerate() {
        let k = k as i32;
        let last = k == n - 1;
        let top = lanes_top + k * (plot_h + LANE_GAP);
        let height = plot_h + if last { X_LABEL_H } else { 0 };
        let area = root.clone().shrink((PAD, top), (w - 2 * PAD, height));
        let mut chart = ChartBuilder::on(&area)
            .y_label_area_size(Y_LABEL_W)
            .x_label_area_size(if last { X_LABEL_H } else { 0 })
            .build_cartesian_2d(x_range.clone(), (Y_AXIS_BOTTOM..y_edge).log_scale())?;
        let mut mesh = chart.configure_mesh();
        mesh.x_labels(14)
            .y_labels(8)
            .x_label_formatter(&format_seconds)
            .y_label_formatter(&format_latency)
            .light_line_style(TRANSPARENT)
            .bold_line_style(GRID.stroke_width(1))
            .axis_style(FRAME.stroke_width(1))
            .label_style(font(12.0).color(&INK))
            .axis_desc_style(font(12.5).color(&INK))
            .y_desc(format!("{f} latency"));
        if last {
            mesh.x_desc("seconds since start");
        }
        mesh.draw()?;
        chart.plotting_area().draw(&Rectangle::new(
            [(0.0, Y_AXIS_BOTTOM), (model.end_s(), y_edge)],
            FRAME.stroke_width(1),
        ))?;
        // Name the info band in the tick labels' column.
        let (x, y) = chart.backend_coord(&(0.0, y_edge));
        root.draw(&Text::new(
            "info",
            (x - 6, y + 5),
            font(12.0)
                .style(FontStyle::Italic)
                .color(&INFO_ORANGE)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
        charts.push(chart);
    }

    // Fault windows: one band per window over all lanes, then their labels.
    let (Some(first), Some(last)) = (charts.first(), charts.last()) else {
        root.present()?;
        return Ok(());
    };
    let band_top = strip_top;
    let band_bottom = last.plotting_area().get_pixel_range().1.end;
    let px = |t_ns: u64| first.backend_coord(&(t_ns as f64 / 1e9, y_edge)).0;
    for window in &model.windows {
        let (x0, x1) = (px(window.start_ns), px(model.window_end_ns(window)));
        let colour = window.family.colour();
        root.draw(&Rectangle::new(
            [(x0, band_top), (x1.max(x0 + 1), band_bottom)],
            colour.mix(WINDOW_ALPHA).filled(),
        ))?;
        root.draw(&PathElement::new(
            vec![(x0, band_top), (x0, band_bottom)],
            colour.mix(0.6).stroke_width(1),
        ))?;
    }
    for instant in &model.instants {
        let x = px(instant.t_ns);
        root.draw(&PathElement::new(
            vec![(x, band_top), (x, band_bottom)],
            instant.family.colour().mix(0.7).stroke_width(1),
        ))?;
    }
    for (x, row, label, colour) in &labels {
        root.draw(&Text::new(
            label.clone(),
            (x.round() as i32, strip_top + *row as i32 * STRIP_ROW_H + 2),
            font(11.0)
                .style(FontStyle::Bold)
                .color(colour)
                .pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
    }

    // The operations, rarest outcome on top.
    for (chart, f) in charts.iter_mut().zip(&lane_fs) {
        let lane = || model.marks.iter().filter(move |m| m.f == *f);
        let at = |m: &Mark| {
            let latency = (m.done_ns - m.invoke_ns) as f64 / 1e6;
            (m.invoke_ns as f64 / 1e9, latency.clamp(Y_MIN_MS, y_top))
        };
        let infos: Vec<&Mark> = lane().filter(|m| m.outcome == Outcome::Info).collect();
        for m in &infos {
            let (x0, y) = chart.backend_coord(&(m.invoke_ns as f64 / 1e9, y_edge));
            let x1 = chart.backend_coord(&(m.done_ns as f64 / 1e9, y_edge)).0;
            if x1 > x0 {
                root.draw(&PathElement::new(
                    vec![(x0, y + 3), (x1, y + 3)],
                    INFO_ORANGE.mix(BAR_ALPHA).stroke_width(3),
                ))?;
            }
        }
        chart.draw_series(
            lane()
                .filter(|m| m.outcome == Outcome::Ok)
                .map(|m| Circle::new(at(m), 2, OK_GREEN.mix(OK_ALPHA).filled())),
        )?;
        chart.draw_series(
            lane()
                .filter(|m| m.outcome == Outcome::Fail)
                .map(|m| Cross::new(at(m), 3, FAIL_RED.mix(FAIL_ALPHA).stroke_width(2))),
        )?;
        chart.draw_series(infos.iter().map(|m| {
            EmptyElement::at((m.invoke_ns as f64 / 1e9, y_edge))
                + Polygon::new(
                    vec![(-4, 0), (4, 0), (0, 7)],
                    INFO_ORANGE.mix(INFO_ALPHA).filled(),
                )
        }))?;
    }
    root.present()?;
    Ok(())
}

/// The legend, right-aligned at `right`: outcomes on the first row, the fault families
/// present on the second.
fn draw_legend(root: &DrawingArea<SVGBackend, Shift>, model: &Model, right: i32) -> DrawResult<()> {
    let label_w = |s: &str| (s.chars().count() as f64 * 6.6).round() as i32;
    let style = text_style(12.0, INK, HPos::Left, VPos::Center);

    let outcomes = [
        (Outcome::Ok, "ok"),
        (Outcome::Fail, "fail"),
        (Outcome::Info, "info (unknown; top edge, bar until give-up)"),
    ];
    let width: i32 = outcomes.iter().map(|(_, s)| 14 + label_w(s) + 16).sum();
    let (mut x, y) = (right - width, 20);
    for (outcome, text) in outcomes {
        match outcome {
            Outcome::Ok => root.draw(&Circle::new((x + 5, y), 4, OK_GREEN.filled()))?,
            Outcome::Fail => root.draw(&Cross::new((x + 5, y), 4, FAIL_RED.stroke_width(2)))?,
            Outcome::Info => root.draw(&Polygon::new(
                vec![(x + 1, y - 4), (x + 9, y - 4), (x + 5, y + 3)],
                INFO_ORANGE.filled(),
            ))?,
        }
        root.draw(&Text::new(text, (x + 14, y), style.clone()))?;
        x += 14 + label_w(text) + 16;
    }

    let families: Vec<Family> = Family::ALL
        .into_iter()
        .filter(|f| {
            model.windows.iter().any(|w| w.family == *f)
                || model.instants.iter().any(|i| i.family == *f)
        })
        .collect();
    let width: i32 = families
        .iter()
        .map(|f| 18 + label_w(f.name()) + 16)
        .sum::<i32>()
        + label_w("faults:")
        + 8;
    let (mut x, y) = (right - width, 42);
    if families.is_empty() {
        return Ok(());
    }
    root.draw(&Text::new("faults:", (x, y), style.clone()))?;
    x += label_w("faults:") + 8;
    for family in families {
        root.draw(&Rectangle::new(
            [(x, y - 6), (x + 12, y + 6)],
            family.colour().mix(0.35).filled(),
        ))?;
        root.draw(&Rectangle::new(
            [(x, y - 6), (x + 12, y + 6)],
            family.colour().stroke_width(1),
        ))?;
        root.draw(&Text::new(family.name(), (x + 18, y), style.clone()))?;
        x += 18 + label_w(family.name()) + 16;
    }
    Ok(())
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn html_page(title: &str, svg: &str, summary: &str) -> String {
    let title = escape_html(title);
    let summary = if summary.trim().is_empty() {
        String::new()
    } else {
        format!("<h2>Summary</h2>\n<pre>{}</pre>\n", escape_html(summary))
    };
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px 24px; color: #222; }}
figure {{ margin: 0; }}
svg {{ max-width: 100%; height: auto; }}
ul.legend {{ line-height: 1.5; }}
.ok {{ color: #1a9850; }} .fail {{ color: #d73027; }} .info {{ color: #e08214; }}
pre {{ background: #f6f6f6; padding: 10px; overflow: auto; }}
</style>
</head>
<body>
<h1>{title}</h1>
<figure>
{svg}
</figure>
<ul class="legend">
<li>Each mark is one operation, at the time it was invoked (x, seconds since the run
started), as high as its latency (y, milliseconds, log scale), in the lane of its kind
(read, write, cas).</li>
<li><span class="ok">&#9679; ok</span>: it happened. <span class="fail">&#10005; fail</span>:
it certainly did not. <span class="info">&#9660; info</span>: unknown outcome; drawn on the
lane's top edge, with a faint bar until the client gave up (or the run ended).</li>
<li>Shaded bands are fault windows, from the nemesis's start to its stop (or the end of the
run), one colour per family, labelled with their targets above the lanes.</li>
</ul>
{summary}</body>
</html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{NemesisEvent, NemesisProc, Op, OpResult};
    use kvnode_testkit::Rng;

    /// Builds histories in time order.
    #[derive(Default)]
    struct Builder {
        events: Vec<(u64, usize, Event)>,
    }

    impl Builder {
        fn push(&mut self, t_ns: u64, event: Event) {
            let seq = self.events.len();
            self.events.push((t_ns, seq, event));
        }

        /// An op invoked at `t_ms`, completing as `done` after `latency_ms` (`None`: never).
        fn op(&mut self, proc: u64, f: F, t_ms: f64, done: Option<(OpType, f64)>) {
            let t = (t_ms * 1e6) as u64;
            let mut invoke = Op::invoke(0, t, proc, f, "k1");
            if f != F::Read {
                invoke.value = Some(format!("{proc}-{t}"));
            }
            self.push(t, Event::Op(invoke.clone()));
            if let Some((kind, latency_ms)) = done {
                let t_done = t + (latency_ms * 1e6) as u64;
                let res = OpResult::default();
                self.push(
                    t_done,
                    Event::Op(Op::complete(&invoke, 0, t_done, kind, res)),
                );
            }
        }

        fn nemesis(&mut self, t_ms: f64, kind: OpType, f: &str, info: serde_json::Value) {
            let t = (t_ms * 1e6) as u64;
            self.push(
                t,
                Event::Nemesis(NemesisEvent {
                    i: 0,
                    t_ns: t,
                    proc: NemesisProc,
                    kind,
                    f: f.to_string(),
                    info,
                }),
            );
        }

        fn build(mut self) -> History {
            self.events.sort_by_key(|(t, seq, _)| (*t, *seq));
            let events = self
                .events
                .into_iter()
                .enumerate()
                .map(|(i, (_, _, mut e))| {
                    match &mut e {
                        Event::Op(op) => op.i = i as u64,
                        Event::Nemesis(n) => n.i = i as u64,
                    }
                    e
                })
                .collect();
            History { events }
        }
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    /// The style signatures of the markers the SVG backend writes.
    fn ok_markers(svg: &str) -> usize {
        count(
            svg,
            &format!(r##"r="2" opacity="{OK_ALPHA}" fill="#1A9850""##),
        )
    }

    fn fail_markers(svg: &str) -> usize {
        // A cross is two lines.
        count(
            svg,
            &format!(r##"<line opacity="{FAIL_ALPHA}" stroke="#D73027" stroke-width="2""##),
        ) / 2
    }

    fn info_markers(svg: &str) -> usize {
        count(
            svg,
            &format!(r##"<polygon opacity="{INFO_ALPHA}" fill="#E08214""##),
        )
    }

    fn fault_bands(svg: &str) -> usize {
        count(svg, &format!(r#"opacity="{WINDOW_ALPHA}" fill=""#))
    }

    fn small_history() -> History {
        let mut b = Builder::default();
        let mut proc = 0;
        for (k, f) in [F::Read, F::Write, F::Cas].into_iter().enumerate() {
            let t0 = k as f64 * 100.0;
            for (j, done) in [
                Some((OpType::Ok, 1.5)),
                Some((OpType::Ok, 12.0)),
                Some((OpType::Fail, 300.0)),
                Some((OpType::Info, 1000.0)),
                None,
            ]
            .into_iter()
            .enumerate()
            {
                b.op(proc, f, t0 + j as f64 * 400.0, done);
                proc += 1;
            }
        }
        b.nemesis(
            200.0,
            OpType::Info,
            "start-partition",
            serde_json::json!({"grudge": {"1": [2, 3], "2": [1], "3": [1]}}),
        );
        b.nemesis(
            900.0,
            OpType::Info,
            "stop-partition",
            serde_json::Value::Null,
        );
        b.nemesis(
            1500.0,
            OpType::Info,
            "start-kill",
            serde_json::json!({"targets": [3]}),
        );
        b.build()
    }

    #[test]
    fn a_small_history_draws_every_op_and_window() {
        let history = small_history();
        let options = TimelineOptions {
            title: "small <run> & co".to_string(),
            ..TimelineOptions::default()
        };
        let svg = timeline_svg(&history, &options).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("small &lt;run&gt; &amp; co"));
        assert_eq!(count(&svg, "<svg"), 1);
        // 3 lanes × (2 ok, 1 fail, 2 info).
        assert_eq!(ok_markers(&svg), 6, "{svg}");
        assert_eq!(fail_markers(&svg), 3);
        assert_eq!(info_markers(&svg), 6);
        assert_eq!(fault_bands(&svg), 2);
        assert!(svg.contains("partition 1 | 2,3"), "{svg}");
        assert!(svg.contains("kill 3"), "{svg}");
        for lane in ["read latency", "write latency", "cas latency"] {
            assert!(svg.contains(lane), "{lane}");
        }
        assert!(svg.contains("seconds since start"));
        assert!(svg.contains("1 s") && svg.contains("0.1 ms"), "{svg}");
        // Every element is closed.
        assert_eq!(count(&svg, "<text"), count(&svg, "</text>"));
    }

    #[test]
    fn fault_windows_pair_starts_with_stops() {
        let mut b = Builder::default();
        // Logged as invoke then info: one window, from the first start to the last stop.
        b.nemesis(
            100.0,
            OpType::Invoke,
            "start-partition",
            serde_json::Value::Null,
        );
        b.nemesis(
            150.0,
            OpType::Info,
            "start-partition",
            serde_json::json!({"nodes": ["n1", "n2"]}),
        );
        b.nemesis(
            500.0,
            OpType::Invoke,
            "stop-partition",
            serde_json::Value::Null,
        );
        b.nemesis(
            600.0,
            OpType::Info,
            "stop-partition",
            serde_json::Value::Null,
        );
        b.nemesis(
            700.0,
            OpType::Info,
            "start-pause",
            serde_json::json!({"targets": "primaries"}),
        );
        b.nemesis(800.0, OpType::Info, "stop-pause", serde_json::Value::Null);
        b.nemesis(
            900.0,
            OpType::Info,
            "start-clock-skew",
            serde_json::Value::Null,
        );
        b.nemesis(
            950.0,
            OpType::Info,
            "start-bitflip",
            serde_json::Value::Null,
        );
        b.nemesis(
            990.0,
            OpType::Info,
            "kill-leader",
            serde_json::json!({"node": 2}),
        );
        b.nemesis(
            1000.0,
            OpType::Info,
            "stop-bitflip",
            serde_json::Value::Null,
        );
        let history = b.build();
        let (windows, instants) = fault_windows(&history);
        let summary: Vec<(Family, u64, Option<u64>, String)> = windows
            .iter()
            .map(|w| {
                (
                    w.family,
                    w.start_ns / 1_000_000,
                    w.end_ns.map(|t| t / 1_000_000),
                    w.label(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    Family::Partition,
                    100,
                    Some(600),
                    "partition n1,n2".to_string()
                ),
                (Family::Pause, 700, Some(800), "pause primaries".to_string()),
                (Family::Clock, 900, None, "clock".to_string()),
                (Family::Other, 950, Some(1000), "bitflip".to_string()),
            ]
        );
        assert_eq!(instants.len(), 1);
        assert_eq!(instants[0].family, Family::Kill);
        assert_eq!(instants[0].label, "kill-leader 2");
        let svg = timeline_svg(&history, &TimelineOptions::default()).unwrap();
        assert_eq!(fault_bands(&svg), 4);
    }

    #[test]
    fn an_empty_history_renders() {
        let svg = timeline_svg(&History::new(), &TimelineOptions::default()).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("kvnode fault test"));
        assert!(svg.contains("0 ops"));
        assert_eq!(
            ok_markers(&svg) + fail_markers(&svg) + info_markers(&svg),
            0
        );
        assert_eq!(fault_bands(&svg), 0);
        // Tiny sizes are raised to a legible minimum rather than failing.
        let tiny = TimelineOptions {
            width: 10,
            height: 10,
            ..TimelineOptions::default()
        };
        assert!(timeline_svg(&small_history(), &tiny).is_ok());
    }

    #[test]
    fn a_malformed_history_is_an_error() {
        let mut invoke = Op::invoke(0, 10, 1, F::Read, "k");
        let done = Op::complete(&invoke, 1, 20, OpType::Ok, OpResult::default());
        invoke.i = 2;
        let history = History::from_ops([done, invoke]);
        assert!(matches!(
            timeline_svg(&history, &TimelineOptions::default()),
            Err(HistoryError::CompletionWithoutInvoke { .. })
        ));
    }

    #[test]
    fn write_timeline_writes_the_svg_and_the_page() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report");
        let summary = "linearizable: yes\nlost writes: 0 <none>";
        let (svg_path, html_path) =
            write_timeline(&small_history(), &TimelineOptions::default(), summary, &out).unwrap();
        assert_eq!(svg_path, out.join("timeline.svg"));
        assert_eq!(html_path, out.join("timeline.html"));
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        let html = std::fs::read_to_string(&html_path).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains(svg.trim_end()), "the page embeds the SVG");
        assert!(html.contains("<pre>linearizable: yes\nlost writes: 0 &lt;none&gt;</pre>"));
        assert!(html.contains("fault windows"));
        // No summary, no <pre>.
        write_timeline(&History::new(), &TimelineOptions::default(), "", &out).unwrap();
        let html = std::fs::read_to_string(&html_path).unwrap();
        assert!(!html.contains("<pre>"));
    }

    #[test]
    fn large_histories_thin_ok_reads_only() {
        let mut b = Builder::default();
        let mut rng = Rng::new(7);
        let mut fails = 0;
        let mut infos = 0;
        for p in 0..30_000u64 {
            let t = p as f64 * 2.0;
            let roll = rng.range(0, 99);
            let (f, done) = match roll {
                0..=79 => (F::Read, (OpType::Ok, 1.0 + rng.range(0, 50) as f64 / 10.0)),
                80..=89 => (F::Write, (OpType::Ok, 3.0)),
                90..=94 => {
                    fails += 1;
                    (F::Read, (OpType::Fail, 40.0))
                }
                _ => {
                    infos += 1;
                    (F::Cas, (OpType::Info, 1000.0))
                }
            };
            b.op(p, f, t, Some(done));
        }
        let history = b.build();
        let model = Model::build(&history).unwrap();
        assert!(model.stride > 1);
        assert!(model.marks.len() <= MAX_MARKS, "{}", model.marks.len());
        let svg = timeline_svg(&history, &TimelineOptions::default()).unwrap();
        assert_eq!(fail_markers(&svg), fails);
        assert_eq!(info_markers(&svg), infos);
        assert!(svg.contains("ok reads thinned"));
        assert!(svg.len() < 4_000_000, "{} bytes", svg.len());
    }

    /// A 60 s run on 5 nodes: two partitions and a kill, with latencies rising and `info`s
    /// appearing during the faults.
    fn sample_history(seed: u64) -> History {
        let mut rng = Rng::new(seed);
        let mut uniform = move || rng.next_u64() as f64 / u64::MAX as f64;
        let mut b = Builder::default();
        let minority_1 = serde_json::json!({"grudge": {"1": [2, 3, 4, 5], "2": [1], "3": [1], "4": [1], "5": [1]}});
        let split = serde_json::json!({"grudge": {"1": [3, 4, 5], "2": [3, 4, 5], "3": [1, 2], "4": [1, 2], "5": [1, 2]}});
        b.nemesis(12_000.0, OpType::Info, "start-partition", minority_1);
        b.nemesis(
            20_000.0,
            OpType::Info,
            "stop-partition",
            serde_json::Value::Null,
        );
        b.nemesis(
            27_000.0,
            OpType::Info,
            "start-kill",
            serde_json::json!({"targets": [3]}),
        );
        b.nemesis(
            33_000.0,
            OpType::Info,
            "stop-kill",
            serde_json::json!({"targets": [3]}),
        );
        b.nemesis(40_000.0, OpType::Info, "start-partition", split);
        b.nemesis(
            48_000.0,
            OpType::Info,
            "stop-partition",
            serde_json::Value::Null,
        );
        let workers = 10u64;
        for w in 0..workers {
            let node = w % 5 + 1;
            let mut proc = w;
            let mut t = uniform() * 300.0;
            while t < 60_000.0 {
                let roll = uniform();
                let f = if roll < 0.6 {
                    F::Read
                } else if roll < 0.85 {
                    F::Write
                } else {
                    F::Cas
                };
                // Log-normal-ish noise around a median.
                let z: f64 = (0..4).map(|_| uniform()).sum::<f64>() - 2.0;
                let noise = (z * 0.9).exp();
                let base = match f {
                    F::Read => 0.6,
                    F::Write => 2.5,
                    F::Cas => 3.5,
                } * noise;
                let in_window = |a: f64, b: f64| t >= a && t < b;
                let minority = (in_window(12_000.0, 20_000.0) && node == 1)
                    || (in_window(40_000.0, 48_000.0) && node <= 2);
                let killed = in_window(27_000.0, 33_000.0) && node == 3;
                let settling = in_window(12_000.0, 14_000.0)
                    || in_window(27_000.0, 28_500.0)
                    || in_window(40_000.0, 42_000.0)
                    || in_window(20_000.0, 20_800.0)
                    || in_window(48_000.0, 48_800.0);
                let done = if minority {
                    if uniform() < 0.55 {
                        (OpType::Info, 1000.0)
                    } else {
                        (OpType::Fail, 150.0 + uniform() * 700.0)
                    }
                } else if killed {
                    if uniform() < 0.8 {
                        (OpType::Fail, 0.2 + uniform() * 0.8)
                    } else {
                        (OpType::Info, 1000.0)
                    }
                } else if settling {
                    (OpType::Ok, base * 20.0 + uniform() * 900.0)
                } else if uniform() < 0.003 {
                    (OpType::Fail, base)
                } else {
                    (OpType::Ok, base)
                };
                b.op(proc, f, t, Some(done));
                if done.0 == OpType::Info {
                    proc += workers;
                }
                t += done.1 + 150.0 + uniform() * 200.0;
            }
        }
        b.build()
    }

    #[test]
    fn a_sample_run_renders_legibly() {
        let history = sample_history(42);
        let ops = history.pair().unwrap();
        assert!((1_500..3_000).contains(&ops.len()), "{} ops", ops.len());
        let options = TimelineOptions {
            title: "kvnode fault test — sample: 5 nodes, 10 clients, 60 s".to_string(),
            ..TimelineOptions::default()
        };
        let svg = timeline_svg(&history, &options).unwrap();
        let infos = ops.iter().filter(|op| op.output == Output::Info).count();
        let fails = ops.iter().filter(|op| op.output == Output::Fail).count();
        assert!(infos > 10 && fails > 10, "{infos} info, {fails} fail");
        assert_eq!(info_markers(&svg), infos);
        assert_eq!(fail_markers(&svg), fails);
        assert_eq!(ok_markers(&svg), ops.len() - infos - fails);
        assert_eq!(fault_bands(&svg), 3);
        assert!(svg.len() < 400_000, "{} bytes", svg.len());
        let dir = std::env::temp_dir();
        std::fs::write(dir.join("timeline-sample.svg"), &svg).unwrap();
        let summary = format!("{} ops, {infos} info, {fails} fail (synthetic)", ops.len());
        write_timeline(&history, &options, &summary, &dir.join("timeline-sample")).unwrap();
    }
}
