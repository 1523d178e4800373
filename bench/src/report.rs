//! The results of a run: a JSON document and a Markdown table.

use crate::run::RunOpts;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// The measurement itself went wrong (errors, skipped requests): no verdict.
    Invalid,
    Info,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Invalid => "invalid run",
            Verdict::Info => "—",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub measure: String,
    pub direct: String,
    pub nginx: String,
    pub relay: String,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Debug)]
pub struct Report {
    pub run_id: String,
    pub started_at: String,
    pub plan: Value,
    pub machine: Value,
    pub sections: serde_json::Map<String, Value>,
    pub rows: Vec<Row>,
    pub error: Option<String>,
    pub elapsed_secs: f64,
    pub logs: String,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "nproc": sh("nproc", &[]).parse::<u64>().unwrap_or(0),
        "cpu_model": model,
        "memory_gib": (mem_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": sh("uname", &["-r"]),
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "nginx": sh("sh", &["-c", "nginx -v 2>&1"]),
        "rustc": sh("rustc", &["--version"]),
        "git": sh("git", &["describe", "--always", "--dirty"]),
    })
}

impl Report {
    pub fn new(opts: &RunOpts) -> Self {
        Self {
            run_id: opts.run_id.clone(),
            started_at: chrono::Utc::now().to_rfc3339(),
            plan: opts.plan.json(),
            machine: machine(),
            sections: serde_json::Map::new(),
            rows: Vec::new(),
            error: None,
            elapsed_secs: 0.0,
            logs: String::new(),
        }
    }

    pub fn set(&mut self, key: &str, v: Value) {
        self.sections.insert(key.to_string(), v);
    }

    pub fn json(&self) -> Value {
        json!({
            "run_id": self.run_id,
            "started_at": self.started_at,
            "elapsed_secs": self.elapsed_secs,
            "plan": self.plan,
            "machine": self.machine,
            "error": self.error,
            "table": self.rows.iter().map(|r| json!({
                "scenario": r.scenario, "measure": r.measure, "direct": r.direct, "nginx": r.nginx,
                "relay": r.relay, "target": r.target, "verdict": r.verdict.as_str().trim_matches('*'),
            })).collect::<Vec<_>>(),
            "results": self.sections,
        })
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        s.push_str(&format!(
            "### relay-bench run {} ({} mode, {:.0} s)\n\n",
            self.run_id,
            self.plan["mode"].as_str().unwrap_or(""),
            self.elapsed_secs
        ));
        s.push_str(&format!(
            "Machine: {} × {}, {} GiB, Linux {}; {}; git {}. Load average at start: {}.\n\n",
            m["nproc"],
            m["cpu_model"].as_str().unwrap_or(""),
            m["memory_gib"],
            m["kernel"].as_str().unwrap_or(""),
            m["nginx"].as_str().unwrap_or(""),
            m["git"].as_str().unwrap_or(""),
            m["loadavg_at_start"].as_str().unwrap_or("")
        ));
        s.push_str(
            "Latency cells: the percentile over all rounds pooled, then `added`: the median over rounds of \
             (target's percentile − direct's percentile in the same round), with (min … max) over rounds. \
             Other cells: median over repetitions with (min … max).\n\n",
        );
        s.push_str("| scenario | measure | direct | nginx | relay | target | verdict |\n");
        s.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                r.scenario,
                r.measure,
                r.direct,
                r.nginx,
                r.relay,
                r.target,
                r.verdict.as_str()
            ));
        }
        if let Some(e) = &self.error {
            s.push_str(&format!("\n**The run stopped early:** {e}\n"));
        }
        s
    }
}
