//! A profile of the worker while it drains: `perf record` on its process
//! (main thread and network threads), folded stacks, and a flame graph
//! SVG. Without `perf` (Debian's linux-perf) the bench goes on without it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Profiler {
    child: Child,
    data: PathBuf,
}

/// Start sampling process `pid` (all its threads) into `data`.
pub fn start(pid: i32, data: &Path) -> Option<Profiler> {
    let child = Command::new("perf")
        .args(["record", "-F", "199", "--call-graph", "dwarf,4096", "-p", &pid.to_string(), "-o"])
        .arg(data)
        .args(["--", "sleep", "3600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // perf needs a moment to attach before the work starts.
    std::thread::sleep(std::time::Duration::from_millis(500));
    Some(Profiler { child, data: data.to_path_buf() })
}

impl Profiler {
    /// Stop sampling and write the flame graph to `svg`; the share of
    /// samples in the worker's main thread (`postgres`) and in its network
    /// threads (`outbox-net`).
    pub fn finish(mut self, title: &str, svg: &Path) -> Result<(f64, f64), String> {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().map_err(|e| e.to_string())?;
        let out = Command::new("perf")
            .args(["script", "-F", "comm,ip,sym", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("perf script: {e}"))?;
        let folded = fold(&String::from_utf8_lossy(&out.stdout));
        let total: u64 = folded.values().sum();
        if total == 0 {
            return Err("no samples".into());
        }
        let share = |comm: &str| {
            folded.iter().filter(|(k, _)| k.starts_with(&format!("{comm};"))).map(|(_, v)| *v).sum::<u64>() as f64
                / total as f64
        };
        std::fs::write(svg, flame_graph(title, &folded)).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&self.data);
        Ok((share("postgres"), share("outbox-net")))
    }
}

/// `perf script` output (a header line per sample, then its frames, leaf
/// first, then a blank line) folded into "comm;root;...;leaf" -> samples.
fn fold(script: &str) -> BTreeMap<String, u64> {
    let mut folded = BTreeMap::new();
    for sample in script.split("\n\n") {
        let mut lines = sample.lines().filter(|l| !l.trim().is_empty());
        let Some(header) = lines.next() else { continue };
        let comm = header.split_whitespace().next().unwrap_or("?").to_string();
        let mut frames: Vec<String> = lines
            .map(|l| {
                // "    7f12ab sym+0x1f (dso)": the symbol, without offset.
                let l = l.trim();
                let sym = l.split_once(' ').map_or("", |(_, rest)| rest);
                let sym = sym.rsplit_once(" (").map_or(sym, |(s, _)| s);
                let sym = sym.rsplit_once("+0x").map_or(sym, |(s, _)| s);
                sym.replace(';', ":")
            })
            // Frames perf could not name (beyond the stack it copied, or
            // without symbols) would only split the graph.
            .filter(|sym| !sym.is_empty() && sym != "[unknown]")
            .collect();
        frames.reverse();
        let key = std::iter::once(comm).chain(frames).collect::<Vec<_>>().join(";");
        *folded.entry(key).or_insert(0) += 1;
    }
    folded
}

#[derive(Default)]
struct Node {
    samples: u64,
    children: BTreeMap<String, Node>,
}

/// A flame graph: the root at the bottom, a frame's width its share of
/// the samples; hover a frame for its name and share.
fn flame_graph(title: &str, folded: &BTreeMap<String, u64>) -> String {
    let mut root = Node::default();
    let mut depth_max = 0;
    for (stack, n) in folded {
        root.samples += n;
        let mut node = &mut root;
        for (depth, frame) in stack.split(';').enumerate() {
            node = node.children.entry(frame.to_string()).or_default();
            node.samples += n;
            depth_max = depth_max.max(depth + 1);
        }
    }
    let (width, row) = (1200.0, 16.0);
    let height = row * (depth_max as f64 + 3.0);
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"monospace\" font-size=\"11\">\n\
         <text x=\"10\" y=\"16\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    let mut canvas =
        Canvas { svg, scale: (width - 20.0) / root.samples.max(1) as f64, total: root.samples, height: height - 16.0 };
    canvas.draw(&root, "all", 10.0, 0);
    let mut svg = canvas.svg;
    svg.push_str("</svg>\n");
    svg
}

struct Canvas {
    svg: String,
    /// Pixels per sample.
    scale: f64,
    total: u64,
    /// Where the bottom row ends.
    height: f64,
}

impl Canvas {
    fn draw(&mut self, node: &Node, name: &str, x: f64, depth: usize) {
        let w = node.samples as f64 * self.scale;
        if w < 0.5 {
            return;
        }
        let y = self.height - 16.0 * (depth as f64 + 1.0);
        let hash = name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
        let color = format!("rgb({},{},{})", 205 + hash % 50, 80 + (hash >> 8) % 120, 40 + (hash >> 16) % 40);
        let pct = node.samples as f64 * 100.0 / self.total as f64;
        let chars = ((w - 4.0) / 7.0).max(0.0) as usize;
        let label: String = if name.chars().count() <= chars {
            name.to_string()
        } else if chars > 2 {
            name.chars().take(chars - 2).collect::<String>() + ".."
        } else {
            String::new()
        };
        let _ = writeln!(
            self.svg,
            "<g><title>{} ({:.2} %)</title><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"15\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text></g>",
            escape(name),
            pct,
            x + 2.0,
            y + 11.0,
            escape(&label)
        );
        let mut cx = x;
        for (child_name, child) in &node.children {
            self.draw(child, child_name, cx, depth + 1);
            cx += child.samples as f64 * self.scale;
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
