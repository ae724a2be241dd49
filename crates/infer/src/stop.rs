//! Stop sequences: generated text is cut before the first occurrence of any of them.
//!
//! Text arrives in pieces (one or a few tokens each) and a stop sequence may straddle pieces,
//! so the matcher holds back the longest tail that could still begin a stop sequence and
//! releases it once it no longer can. Streaming and whole answers thus give the same text.

/// Cuts streamed text at the first stop sequence.
#[derive(Debug, Clone, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Text received but not yet released: a possible start of a stop sequence.
    pending: String,
    stopped: bool,
}

impl StopText {
    /// A matcher for `stops`; empty strings are ignored (they would match before any text).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Whether a stop sequence has been seen; nothing more is released after it.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next piece of text and returns what may be shown now: everything up to the
    /// first stop sequence, minus a held-back tail that may be the start of one.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.stopped = true;
            let mut out = std::mem::take(&mut self.pending);
            out.truncate(at);
            return out;
        }
        let keep = self.held_back_len();
        let cut = self.pending.len() - keep;
        let rest = self.pending.split_off(cut);
        std::mem::replace(&mut self.pending, rest)
    }

    /// The text still held back, released when generation ends without a stop sequence.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// The length in bytes of the longest tail of `pending` that is a proper prefix of a stop
    /// sequence (always on a character boundary, since the stops are whole strings).
    fn held_back_len(&self) -> usize {
        let p = &self.pending;
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(p.len() + 1))
                    .rev()
                    .filter(|&n| s.is_char_boundary(n) && p.ends_with(&s[..n]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopText::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            out += &m.push(p);
        }
        out += &m.finish();
        (out, m.stopped())
    }

    #[test]
    fn cuts_before_a_stop_inside_one_piece() {
        assert_eq!(run(&["\n"], &["ab\ncd"]), ("ab".into(), true));
    }

    #[test]
    fn finds_a_stop_split_across_pieces() {
        assert_eq!(
            run(&["END"], &["one E", "N", "Dtwo"]),
            ("one ".into(), true)
        );
    }

    #[test]
    fn releases_a_false_start() {
        let mut m = StopText::new(["END".to_string()]);
        assert_eq!(m.push("one EN"), "one ");
        assert_eq!(m.push("x"), "ENx");
        assert_eq!(m.finish(), "");
        assert!(!m.stopped());
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        assert_eq!(run(&["cd", "bcx"], &["ab", "cd"]), ("ab".into(), true));
    }

    #[test]
    fn held_back_text_comes_out_at_the_end() {
        assert_eq!(run(&["STOP"], &["all ST"]), ("all ST".into(), false));
    }

    #[test]
    fn multibyte_stops_and_text() {
        assert_eq!(run(&["é!"], &["caf", "é", "! more"]), ("caf".into(), true));
        assert_eq!(run(&["→"], &["a ", "→ b"]), ("a ".into(), true));
    }

    #[test]
    fn nothing_after_a_stop_and_empty_stops_ignored() {
        let mut m = StopText::new(["".to_string(), "x".to_string()]);
        assert_eq!(m.push("ax"), "a");
        assert_eq!(m.push("more"), "");
        assert_eq!(m.finish(), "");
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), false));
    }
}
