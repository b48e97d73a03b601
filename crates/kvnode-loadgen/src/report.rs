//! The side-by-side report of a folder of [`RunResult`] JSON files (`kvctl bench report DIR`):
//! a text table with kvnode/etcd throughput ratios, the same table as markdown (`bench.md`),
//! and a picture of throughput and p99 latency per workload and system (`bench.svg`).
//!
//! Results are paired by workload name ([`RunResult::workload`]); rows come in the order in
//! which their workload first appears in the folder's `*.json` files sorted by file name (so
//! `scripts/bench.sh` numbers its files). If a folder holds two results for the same workload
//! and system, the later file wins. An optional `machine.txt` in the folder (one line, e.g.
//! CPU count, model and kernel) is shown above the markdown table and under the plot's title.
//!
//! The picture is drawn with `plotters`' SVG backend only, as `kvnode_jepsen::timeline` is:
//! text is SVG `<text>`, so no font or system library is needed.

use std::io;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{RunResult, System, thousands};

/// What a report could not do.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Reading the folder or a file, or writing an output, failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A `*.json` file is not a run result.
    #[error("{} is not a load-generator result: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The folder holds no result.
    #[error("no result (*.json) in {}", .0.display())]
    Empty(PathBuf),
    /// plotters failed to draw (does not happen with an in-memory SVG).
    #[error("drawing bench.svg: {0}")]
    Draw(String),
}

/// One workload: the kvnode and the etcd result, when present.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The workload's name.
    pub workload: String,
    /// kvnode's result.
    pub kvnode: Option<RunResult>,
    /// etcd's result.
    pub etcd: Option<RunResult>,
}

impl Row {
    /// kvnode ops/s divided by etcd ops/s, when both ran and etcd did any.
    pub fn ratio(&self) -> Option<f64> {
        match (&self.kvnode, &self.etcd) {
            (Some(k), Some(e)) if e.ops_per_sec > 0.0 => Some(k.ops_per_sec / e.ops_per_sec),
            _ => None,
        }
    }

    /// The label shown for the row: kvnode's run label, else etcd's, else the reads each
    /// did.
    pub fn description(&self) -> String {
        let label = [&self.kvnode, &self.etcd]
            .into_iter()
            .flatten()
            .map(|r| r.label.trim())
            .find(|l| !l.is_empty());
        if let Some(label) = label {
            return label.to_string();
        }
        let reads = |r: &RunResult| format!("{}% {}", r.read_percent, r.read_level);
        match (&self.kvnode, &self.etcd) {
            (Some(k), Some(e)) if reads(k) == reads(e) => format!("{} reads", reads(k)),
            (Some(k), Some(e)) => format!("kvnode {} / etcd {} reads", reads(k), reads(e)),
            (Some(r), None) | (None, Some(r)) => format!("{} reads", reads(r)),
            (None, None) => String::new(),
        }
    }

    fn get(&self, system: System) -> Option<&RunResult> {
        match system {
            System::Kvnode => self.kvnode.as_ref(),
            System::Etcd => self.etcd.as_ref(),
        }
    }
}

/// The results of a folder, paired per workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// One row per workload, in order of first appearance.
    pub rows: Vec<Row>,
    /// The machine the results were measured on (`machine.txt`), if known.
    pub machine: Option<String>,
}

impl Report {
    /// Pairs `results` by workload, in order of first appearance; a later result replaces an
    /// earlier one of the same workload and system.
    pub fn from_results(results: impl IntoIterator<Item = RunResult>) -> Report {
        let mut rows: Vec<Row> = Vec::new();
        for r in results {
            let i = match rows.iter().position(|row| row.workload == r.workload) {
                Some(i) => i,
                None => {
                    rows.push(Row {
                        workload: r.workload.clone(),
                        kvnode: None,
                        etcd: None,
                    });
                    rows.len() - 1
                }
            };
            match r.system {
                System::Kvnode => rows[i].kvnode = Some(r),
                System::Etcd => rows[i].etcd = Some(r),
            }
        }
        Report {
            rows,
            machine: None,
        }
    }

    /// Reads every `*.json` file of `dir` (sorted by name) and `machine.txt` if present.
    pub fn load(dir: &Path) -> Result<Report, ReportError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReportError::Io { path, source }
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_error(dir))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file())
            .collect();
        files.sort();
        let mut results = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
            let result: RunResult =
                serde_json::from_str(&text).map_err(|source| ReportError::Json {
                    path: path.clone(),
                    source,
                })?;
            results.push(result);
        }
        if results.is_empty() {
            return Err(ReportError::Empty(dir.to_path_buf()));
        }
        let mut report = Report::from_results(results);
        report.machine = std::fs::read_to_string(dir.join("machine.txt"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        Ok(report)
    }

    /// The settings every result shares, as a sentence (`64 in flight, 1000 keys, 256-byte
    /// values, 10 s per run`); settings that differ between results are left out.
    pub fn settings(&self) -> String {
        let all: Vec<&RunResult> = self
            .rows
            .iter()
            .flat_map(|r| [&r.kvnode, &r.etcd])
            .flatten()
            .collect();
        let same = |f: &dyn Fn(&RunResult) -> String| {
            let first = f(all.first()?);
            all.iter().all(|r| f(r) == first).then_some(first)
        };
        [
            same(&|r| format!("{} in flight", r.concurrency)),
            same(&|r| format!("{} keys", r.keys)),
            same(&|r| format!("{}-byte values", r.value_bytes)),
            same(&|r| format!("{} s per run", r.seconds)),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
    }

    fn cells(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let header = [
            "workload",
            "what",
            "kvnode ops/s",
            "etcd ops/s",
            "kvnode/etcd",
            "kvnode p50 ms",
            "kvnode p99 ms",
            "etcd p50 ms",
            "etcd p99 ms",
            "errors kvnode/etcd",
        ]
        .map(String::from)
        .to_vec();
        let dash = || "-".to_string();
        let rows = self
            .rows
            .iter()
            .map(|row| {
                let ops = |r: Option<&RunResult>| {
                    r.map_or_else(dash, |r| thousands(r.ops_per_sec.round() as u64))
                };
                let ms = |r: Option<&RunResult>, p99: bool| {
                    r.map_or_else(dash, |r| {
                        let v = if p99 {
                            r.latency_ms.p99
                        } else {
                            r.latency_ms.p50
                        };
                        format!("{v:.2}")
                    })
                };
                let errors = |r: Option<&RunResult>| r.map_or_else(dash, |r| r.errors.to_string());
                let (k, e) = (row.get(System::Kvnode), row.get(System::Etcd));
                vec![
                    row.workload.clone(),
                    row.description(),
                    ops(k),
                    ops(e),
                    row.ratio().map_or_else(dash, |x| format!("{x:.2}x")),
                    ms(k, false),
                    ms(k, true),
                    ms(e, false),
                    ms(e, true),
                    format!("{}/{}", errors(k), errors(e)),
                ]
            })
            .collect();
        (header, rows)
    }

    /// The table as aligned text: text columns left-aligned, numbers right-aligned.
    pub fn table(&self) -> String {
        let (header, rows) = self.cells();
        let width = |c: usize| {
            std::iter::once(&header)
                .chain(&rows)
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..header.len()).map(width).collect();
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    if c < 2 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = line(&header);
        out.push('\n');
        for row in &rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    /// `bench.md`: a heading, the machine and settings, the markdown table, a note on the
    /// ratio and the picture.
    pub fn markdown(&self) -> String {
        let (header, rows) = self.cells();
        let mut out = String::from("# kvnode vs etcd\n\n");
        if let Some(m) = &self.machine {
            out.push_str(&format!("Machine: {m}\n\n"));
        }
        let settings = self.settings();
        if !settings.is_empty() {
            out.push_str(&format!("Closed loop, {settings}.\n\n"));
        }
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        let align: Vec<&str> = (0..header.len())
            .map(|c| if c < 2 { "---" } else { "---:" })
            .collect();
        out.push_str(&format!("|{}|\n", align.join("|")));
        for row in rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out.push_str(
            "\nkvnode/etcd is kvnode's throughput divided by etcd's (above 1: kvnode served \
             more operations per second). Latencies are of successful operations; errors are \
             counted apart.\n\n![Throughput and p99 latency per workload](bench.svg)\n",
        );
        out
    }

    /// `bench.svg`: two panels, throughput and p99 latency, with one bar per system and
    /// workload.
    pub fn svg(&self) -> Result<String, ReportError> {
        let mut svg = String::new();
        render(self, &mut svg).map_err(|e| ReportError::Draw(e.to_string()))?;
        Ok(svg)
    }

    /// Writes `bench.md` and `bench.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ReportError> {
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| ReportError::Io { path, source })
        };
        write("bench.md", self.markdown())?;
        write("bench.svg", self.svg()?)
    }
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 520;
const HEADER_H: i32 = 78;
const INK: RGBColor = RGBColor(33, 37, 41);
const MUTED: RGBColor = RGBColor(108, 117, 125);

fn colour(system: System) -> RGBColor {
    match system {
        System::Kvnode => RGBColor(31, 119, 180),
        System::Etcd => RGBColor(255, 127, 14),
    }
}

fn font(size: f64) -> FontDesc<'static> {
    // plotters' SVG backend writes `font-size` as size / 1.24.
    ("sans-serif", size * 1.24).into_font()
}

fn text_style(size: f64, colour: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    font(size).color(&colour).pos(Pos::new(h, v))
}

/// `12345.6` as `12.3k`, `1234567` as `1.23M`.
fn short_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn render(report: &Report, out: &mut String) -> DrawResult<()> {
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        "kvnode vs etcd: the same closed-loop workload",
        (16, 12),
        font(20.0)
            .style(FontStyle::Bold)
            .color(&INK)
            .pos(Pos::new(HPos::Left, VPos::Top)),
    ))?;
    let subtitle = [report.machine.clone(), Some(report.settings())]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" · ");
    root.draw(&Text::new(
        subtitle,
        (16, 40),
        text_style(12.5, MUTED, HPos::Left, VPos::Top),
    ))?;
    // Legend, top right.
    let mut x = WIDTH as i32 - 200;
    for system in [System::Kvnode, System::Etcd] {
        root.draw(&Rectangle::new(
            [(x, 16), (x + 14, 30)],
            colour(system).filled(),
        ))?;
        root.draw(&Text::new(
            system.to_string(),
            (x + 20, 23),
            text_style(14.0, INK, HPos::Left, VPos::Center),
        ))?;
        x += 90;
    }

    let body = root
        .clone()
        .shrink((0, HEADER_H), (WIDTH, HEIGHT - HEADER_H as u32));
    let (left, right) = body.split_horizontally(WIDTH / 2);
    panel(
        &left,
        report,
        "throughput, ops/s (higher is better)",
        &|r| r.ops_per_sec,
        &short_count,
        &|row| row.ratio().map(|x| format!("kvnode/etcd {x:.2}x")),
    )?;
    panel(
        &right,
        report,
        "p99 latency, ms (lower is better)",
        &|r| r.latency_ms.p99,
        &|v| {
            if v >= 10.0 || v == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        },
        &|_| None,
    )?;
    root.present()?;
    Ok(())
}

/// One panel: per workload a group of two bars (kvnode, etcd), the value above each bar and
/// the workload's name (and `note`, if any) under the group.
fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    report: &Report,
    caption: &str,
    value: &dyn Fn(&RunResult) -> f64,
    label: &dyn Fn(f64) -> String,
    note: &dyn Fn(&Row) -> Option<String>,
) -> DrawResult<()> {
    let n = report.rows.len().max(1);
    let top = report
        .rows
        .iter()
        .flat_map(|r| [&r.kvnode, &r.etcd])
        .flatten()
        .map(value)
        .fold(0.0, f64::max);
    let y_max = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, font(15.0).color(&INK))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..n as f64, 0f64..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| label(*v))
        .y_label_style(font(12.0).color(&MUTED))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(230, 230, 230))
        .axis_style(MUTED)
        .draw()?;
    // The baseline.
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 0.0), (n as f64, 0.0)],
        MUTED,
    )))?;
    const BAR: f64 = 0.34;
    for (i, row) in report.rows.iter().enumerate() {
        let centre = i as f64 + 0.5;
        for (k, system) in [System::Kvnode, System::Etcd].into_iter().enumerate() {
            let Some(r) = row.get(system) else {
                continue;
            };
            let v = value(r);
            let x0 = centre - BAR + k as f64 * BAR;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0 + 0.01, 0.0), (x0 + BAR - 0.01, v)],
                colour(system).filled(),
            )))?;
            chart.draw_series(std::iter::once(
                EmptyElement::at((x0 + BAR / 2.0, v))
                    + Text::new(
                        label(v),
                        (0, -3),
                        text_style(11.0, INK, HPos::Center, VPos::Bottom),
                    ),
            ))?;
        }
        chart.draw_series(std::iter::once(
            EmptyElement::at((centre, 0.0))
                + Text::new(
                    row.workload.clone(),
                    (0, 8),
                    text_style(13.0, INK, HPos::Center, VPos::Top),
                ),
        ))?;
        if let Some(note) = note(row) {
            chart.draw_series(std::iter::once(
                EmptyElement::at((centre, 0.0))
                    + Text::new(
                        note,
                        (0, 26),
                        text_style(11.0, MUTED, HPos::Center, VPos::Top),
                    ),
            ))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Latency;

    /// A result as `kvctl bench --json` writes it.
    fn fixture(system: &str, workload: &str, ops_per_sec: f64, p50: f64, p99: f64) -> String {
        format!(
            "{{\"system\":\"{system}\",\"workload\":\"{workload}\",\"label\":\"\",\
             \"concurrency\":64,\"keys\":1000,\"value_bytes\":256,\"read_percent\":100,\
             \"read_level\":\"linearizable\",\"seconds\":10.0,\"ops\":{},\
             \"ops_per_sec\":{ops_per_sec},\"errors\":0,\"latency_ms\":{{\"p50\":{p50},\
             \"p99\":{p99},\"p999\":{p99},\"max\":{p99}}}}}",
            (ops_per_sec * 10.0) as u64
        )
    }

    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            (
                "01-put-kvnode.json",
                fixture("kvnode", "put", 6000.0, 9.5, 20.0),
            ),
            (
                "02-put-etcd.json",
                fixture("etcd", "put", 4000.0, 14.0, 30.0),
            ),
            (
                "03-get-kvnode.json",
                fixture("kvnode", "get", 10000.0, 6.0, 15.0),
            ),
            (
                "04-get-etcd.json",
                fixture("etcd", "get", 20000.0, 3.0, 8.0),
            ),
            (
                "05-mix-kvnode.json",
                fixture("kvnode", "mix", 1234.5, 1.0, 2.0),
            ),
        ];
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        std::fs::write(
            dir.path().join("machine.txt"),
            "2 CPUs, Test CPU, Linux 6.1\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a result").unwrap();
        dir
    }

    #[test]
    fn rows_pair_systems_by_workload_with_ratios() {
        let dir = folder();
        let report = Report::load(dir.path()).unwrap();
        assert_eq!(
            report.machine.as_deref(),
            Some("2 CPUs, Test CPU, Linux 6.1")
        );
        let names: Vec<&str> = report.rows.iter().map(|r| r.workload.as_str()).collect();
        assert_eq!(names, ["put", "get", "mix"]);
        assert_eq!(report.rows[0].ratio(), Some(1.5));
        assert_eq!(report.rows[1].ratio(), Some(0.5));
        assert_eq!(report.rows[2].ratio(), None);
        assert_eq!(
            report.settings(),
            "64 in flight, 1000 keys, 256-byte values, 10 s per run"
        );

        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("workload"), "{table}");
        let put: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(put[0], "put");
        assert!(
            lines[1].contains("6,000") && lines[1].contains("4,000"),
            "{table}"
        );
        assert!(lines[1].contains("1.50x"), "{table}");
        assert!(
            lines[1].contains("9.50") && lines[1].contains("30.00"),
            "{table}"
        );
        assert!(lines[2].contains("0.50x"), "{table}");
        assert!(lines[2].contains("20,000"), "{table}");
        // mix ran on kvnode only: no ratio, dashes for etcd.
        assert!(lines[3].contains("1,235"), "{table}");
        assert!(lines[3].contains("0/-"), "{table}");
        // The description falls back to what the reads were.
        assert_eq!(report.rows[1].description(), "100% linearizable reads");

        let md = report.markdown();
        assert!(md.contains("Machine: 2 CPUs, Test CPU, Linux 6.1"), "{md}");
        assert!(
            md.contains("| put | 100% linearizable reads | 6,000 | 4,000 | 1.50x |"),
            "{md}"
        );
        assert!(md.contains("![Throughput and p99 latency per workload](bench.svg)"));
    }

    #[test]
    fn the_svg_draws_two_bars_per_paired_workload() {
        let dir = folder();
        let report = Report::load(dir.path()).unwrap();
        report.write(dir.path()).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("bench.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        // 5 results × 2 panels: one filled bar each, in the systems' colours.
        let kv = svg.matches("fill=\"#1F77B4\"").count();
        let etcd = svg.matches("fill=\"#FF7F0E\"").count();
        // + 1 each for the legend.
        assert_eq!((kv, etcd), (3 * 2 + 1, 2 * 2 + 1), "{svg}");
        // plotters writes each text on a line of its own.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for label in [
            "put",
            "get",
            "mix",
            "6.00k",
            "20.0k",
            "30",
            "kvnode",
            "etcd",
            "kvnode/etcd 1.50x",
        ] {
            assert!(texts.contains(&label), "{label} missing");
        }
        assert!(dir.path().join("bench.md").is_file());
    }

    #[test]
    fn a_folder_without_results_or_with_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Report::load(dir.path()),
            Err(ReportError::Empty(_))
        ));
        std::fs::write(dir.path().join("x.json"), "{\"system\":\"redis\"}").unwrap();
        let e = Report::load(dir.path()).unwrap_err();
        assert!(matches!(e, ReportError::Json { .. }), "{e}");
        assert!(e.to_string().contains("x.json"), "{e}");
    }

    #[test]
    fn a_later_result_replaces_an_earlier_one() {
        let r = |ops: f64| RunResult {
            system: System::Etcd,
            workload: "put".into(),
            label: "writes".into(),
            concurrency: 1,
            keys: 1,
            value_bytes: 1,
            read_percent: 0,
            read_level: "linearizable".into(),
            seconds: 1.0,
            ops: ops as u64,
            ops_per_sec: ops,
            errors: 0,
            latency_ms: Latency::default(),
            first_error: None,
        };
        let report = Report::from_results([r(1.0), r(2.0)]);
        assert_eq!(report.rows.len(), 1);
        assert_eq!(report.rows[0].etcd.as_ref().unwrap().ops_per_sec, 2.0);
        assert_eq!(report.rows[0].description(), "writes");
        assert_eq!(short_count(1_234_567.0), "1.23M");
        assert_eq!(short_count(999.4), "999");
    }
}
