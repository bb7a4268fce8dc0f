//! Progress of the long jobs (`rebuild`, `replay`, `import-legacy`): a
//! one-line bar with count, rate and ETA when stderr is a terminal, periodic
//! log lines otherwise (so that log shippers get something parseable and no
//! carriage returns).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the bar is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(200);
/// How often a log line is written when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 30;

/// Reports how far a job has come.
#[derive(Debug)]
pub struct Progress {
    what: &'static str,
    unit: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_shown: Instant,
    terminal: bool,
}

impl Progress {
    /// A job named `what` counting `unit`s, `total` of them when known.
    pub fn new(what: &'static str, unit: &'static str, total: Option<u64>) -> Progress {
        Progress::with_terminal(what, unit, total, std::io::stderr().is_terminal())
    }

    fn with_terminal(
        what: &'static str,
        unit: &'static str,
        total: Option<u64>,
        terminal: bool,
    ) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            unit,
            total,
            done: 0,
            started: now,
            last_shown: now,
            terminal,
        }
    }

    /// Counts `n` more units and shows progress when it is time to.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        let every = if self.terminal { DRAW_EVERY } else { LOG_EVERY };
        if self.last_shown.elapsed() >= every {
            self.last_shown = Instant::now();
            self.show();
        }
    }

    /// Units counted so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Units per second so far.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Draws the bar once more, complete, and ends its line (a summary
    /// follows).
    pub fn finish(&mut self) {
        if self.terminal {
            self.show();
            let _ = writeln!(std::io::stderr());
        }
    }

    fn show(&mut self) {
        if self.terminal {
            let _ = write!(std::io::stderr(), "\r{}", self.line());
            let _ = std::io::stderr().flush();
        } else {
            tracing::info!(
                done = self.done,
                total = self.total,
                per_second = self.rate() as u64,
                "{} in progress",
                self.what
            );
        }
    }

    /// The bar: `rebuild [#####-----] 5,000/10,000 events 2,500/s ETA 2s`.
    fn line(&self) -> String {
        let rate = self.rate();
        match self.total {
            // An estimate the job outgrew shows as a plain count.
            Some(total) if total > 0 && self.done <= total => {
                let fraction = (self.done as f64 / total as f64).clamp(0.0, 1.0);
                let filled = (fraction * BAR_WIDTH as f64).round() as usize;
                let eta = if rate > 0.0 {
                    format!("{:.0}s", total.saturating_sub(self.done) as f64 / rate)
                } else {
                    "?".to_owned()
                };
                format!(
                    "{} [{}{}] {}/{} {} {}/s ETA {}   ",
                    self.what,
                    "#".repeat(filled),
                    "-".repeat(BAR_WIDTH - filled),
                    grouped(self.done),
                    grouped(total),
                    self.unit,
                    grouped(rate as u64),
                    eta
                )
            }
            _ => format!(
                "{} {} {} {}/s   ",
                self.what,
                grouped(self.done),
                self.unit,
                grouped(rate as u64)
            ),
        }
    }
}

/// `1234567` as `1,234,567`.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }

    #[test]
    fn the_bar_shows_count_total_and_eta() {
        let mut p = Progress::with_terminal("rebuild", "events", Some(10), true);
        p.done = 5;
        let line = p.line();
        assert!(
            line.starts_with("rebuild [###############---------------] 5/10 events "),
            "{line}"
        );
        assert!(line.contains("ETA "), "{line}");
        let unknown = Progress::with_terminal("replay", "messages", None, true);
        assert!(
            unknown.line().starts_with("replay 0 messages 0/s"),
            "{}",
            unknown.line()
        );
    }
}
