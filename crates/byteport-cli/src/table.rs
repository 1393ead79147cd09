//! A tiny aligned-column table printer.

/// Rows of cells under a header, printed with columns padded to the widest
/// cell and two spaces between them.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let ncols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(ncols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == ncols {
                    s.push_str(cell);
                } else {
                    s.push_str(cell);
                    s.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `key: value` pairs with the values aligned; a value's further lines
/// line up under its first.
pub fn render_fields(fields: &[(&str, String)]) -> String {
    let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in fields {
        let mut lines = v.split('\n');
        let first = lines.next().unwrap_or("");
        out.push_str(&format!("{:<w$}  {first}\n", format!("{k}:")));
        for l in lines {
            out.push_str(&format!("{:<w$}  {l}\n", ""));
        }
    }
    out
}

/// Prints [`render_fields`].
pub fn print_fields(fields: &[(&str, String)]) {
    print!("{}", render_fields(fields));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["NAME", "STATE"]);
        t.row(vec!["web-1".into(), "pending".into()]);
        t.row(vec!["a".into(), "".into()]);
        assert_eq!(t.render(), "NAME   STATE\nweb-1  pending\na\n");
    }

    #[test]
    fn aligns_fields_and_their_lines() {
        let f = render_fields(&[
            ("id", "x".into()),
            (
                "ports",
                "22 -> 127.0.0.1:20022\n80 -> 127.0.0.1:20080".into(),
            ),
        ]);
        assert_eq!(
            f,
            "id:     x\nports:  22 -> 127.0.0.1:20022\n        80 -> 127.0.0.1:20080\n"
        );
    }
}
