//! The rollup query's named window parameters, and the table and column names the rollup
//! writes to.
//!
//! Postgres takes positional parameters only (`$1`); a rollup's query names its window
//! (`:window_start`, `:window_end`) so it reads like the SQL a user would test by hand. The
//! scanner below knows just enough SQL to find those names outside string literals, quoted
//! identifiers, comments and `::` casts (see docs/decisions/0010-rollup-window-parameters.md).

/// A rollup query with its window parameters made positional: `$1` is the window's start,
/// `$2` its end, both `timestamptz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The rewritten SQL.
    pub sql: String,
}

/// The named parameters and their positions.
const PARAMS: [(&str, &str); 2] = [
    ("window_start", "$1::timestamptz"),
    ("window_end", "$2::timestamptz"),
];

impl Query {
    /// Rewrites `text`; the error says what is wrong and where (a byte offset into the
    /// query) and what the query may use instead.
    pub fn parse(text: &str) -> Result<Query, String> {
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len() + 16);
        let mut seen = [false; 2];
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            match c {
                b'\'' | b'"' => {
                    let end = closing(bytes, i + 1, c).ok_or_else(|| {
                        format!(
                            "a {} opened at byte {i} is never closed",
                            if c == b'\'' {
                                "string literal"
                            } else {
                                "quoted identifier"
                            }
                        )
                    })?;
                    out.push_str(&text[i..end]);
                    i = end;
                }
                b'-' if bytes.get(i + 1) == Some(&b'-') => {
                    let end = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
                    out.push_str(&text[i..end]);
                    i = end;
                }
                b'/' if bytes.get(i + 1) == Some(&b'*') => {
                    let end = text[i + 2..]
                        .find("*/")
                        .map(|n| i + 2 + n + 2)
                        .ok_or_else(|| format!("a comment opened at byte {i} is never closed"))?;
                    out.push_str(&text[i..end]);
                    i = end;
                }
                b'$' => {
                    let next = bytes.get(i + 1).copied();
                    if next.is_some_and(|n| n.is_ascii_digit()) {
                        return Err(format!(
                            "positional parameter at byte {i}: name the window as :window_start and :window_end instead"
                        ));
                    }
                    // A dollar-quoted string ($$…$$ or $tag$…$tag$) is copied whole.
                    let tag_end = text[i + 1..]
                        .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                        .map(|n| i + 1 + n);
                    match tag_end {
                        Some(t) if bytes[t] == b'$' => {
                            let tag = &text[i..=t];
                            let end = text[t + 1..]
                                .find(tag)
                                .map(|n| t + 1 + n + tag.len())
                                .ok_or_else(|| {
                                    format!(
                                        "a {tag}-quoted string opened at byte {i} is never closed"
                                    )
                                })?;
                            out.push_str(&text[i..end]);
                            i = end;
                        }
                        _ => {
                            out.push('$');
                            i += 1;
                        }
                    }
                }
                b':' if bytes.get(i + 1) == Some(&b':') => {
                    out.push_str("::");
                    i += 2;
                }
                b':' if bytes
                    .get(i + 1)
                    .is_some_and(|n| n.is_ascii_alphabetic() || *n == b'_') =>
                {
                    let end = text[i + 1..]
                        .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                        .map_or(bytes.len(), |n| i + 1 + n);
                    let name = &text[i + 1..end];
                    let Some(k) = PARAMS.iter().position(|(p, _)| *p == name) else {
                        return Err(format!(
                            "unknown parameter :{name} at byte {i}: the query may use :window_start and :window_end"
                        ));
                    };
                    seen[k] = true;
                    out.push_str(PARAMS[k].1);
                    i = end;
                }
                _ => {
                    // Copy one whole character (the text is UTF-8).
                    let len = text[i..].chars().next().map_or(1, char::len_utf8);
                    out.push_str(&text[i..i + len]);
                    i += len;
                }
            }
        }
        for (k, (name, _)) in PARAMS.iter().enumerate() {
            if !seen[k] {
                return Err(format!(
                    "the query never uses :{name}: it must read only the window's events, \
                     e.g. `WHERE at >= :window_start AND at < :window_end`"
                ));
            }
        }
        if out.trim().trim_end_matches(';').contains(';') {
            return Err("one statement only: remove the `;` inside the query".into());
        }
        Ok(Query {
            sql: out.trim().trim_end_matches(';').trim_end().to_string(),
        })
    }
}

/// The end (exclusive) of a quoted run starting after its opening `quote` at `from`; a
/// doubled quote is part of the text.
fn closing(bytes: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// A plain identifier (letters, digits, `_`, not starting with a digit), quoted for SQL.
pub fn identifier(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(format!("\"{name}\""))
    } else {
        Err(format!(
            "`{name}` is not a plain identifier (letters, digits and `_`, not starting with a digit)"
        ))
    }
}

/// `table` or `schema.table`, quoted for SQL.
pub fn table_name(name: &str) -> Result<String, String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(format!("`{name}`: write `table` or `schema.table`"));
    }
    Ok(parts
        .iter()
        .map(|p| identifier(p))
        .collect::<Result<Vec<_>, _>>()?
        .join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_window_parameters_become_positional() {
        let q = Query::parse(
            "SELECT date_trunc('hour', at)::timestamptz AS h, ':window_start' AS s, \"a:b\" -- :nope\n\
             FROM events /* :nope */ WHERE at >= :window_start AND at < :window_end GROUP BY 1;",
        )
        .unwrap();
        assert_eq!(
            q.sql,
            "SELECT date_trunc('hour', at)::timestamptz AS h, ':window_start' AS s, \"a:b\" -- :nope\n\
             FROM events /* :nope */ WHERE at >= $1::timestamptz AND at < $2::timestamptz GROUP BY 1"
        );
        let q = Query::parse("SELECT $$:x$$, :window_start, :window_end, 'it''s :x'").unwrap();
        assert_eq!(
            q.sql,
            "SELECT $$:x$$, $1::timestamptz, $2::timestamptz, 'it''s :x'"
        );
    }

    #[test]
    fn bad_queries_are_refused_with_the_reason() {
        let e = Query::parse("SELECT 1 FROM e WHERE at >= :window_start").unwrap_err();
        assert!(e.contains("never uses :window_end"), "{e}");
        let e = Query::parse("SELECT :window_start, :window_end, :day").unwrap_err();
        assert!(e.contains("unknown parameter :day at byte 35"), "{e}");
        let e = Query::parse("SELECT $1, :window_start, :window_end").unwrap_err();
        assert!(e.contains("positional parameter"), "{e}");
        let e = Query::parse("SELECT ':window_start, :window_end").unwrap_err();
        assert!(e.contains("never closed"), "{e}");
        let e = Query::parse("SELECT :window_start, :window_end; DELETE FROM t").unwrap_err();
        assert!(e.contains("one statement"), "{e}");
    }

    #[test]
    fn names_are_plain_identifiers() {
        assert_eq!(table_name("app.views").unwrap(), "\"app\".\"views\"");
        assert_eq!(identifier("window_start").unwrap(), "\"window_start\"");
        assert!(table_name("a.b.c").is_err());
        assert!(identifier("x\"; DROP").is_err());
        assert!(identifier("1x").is_err());
    }
}
