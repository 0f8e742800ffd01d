//! One file's text: comments and literals blanked out ([`strip`]), then the paths it names, resolved from the
//! crate root where they point into the crate ([`references`]).

use std::collections::HashMap;

/// A path one file names into its own crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// 1-based line of the path's last segment (in a multi-line `use` tree, the line of that leaf).
    pub line: usize,
    /// The path as written, `use` trees expanded: `crate::a::{b, c::*}` gives `crate::a::b` and `crate::a::c::*`.
    pub text: String,
    /// Its segments from the crate root: `super::x` in `src/a/b.rs` gives `["a", "x"]`.
    pub path: Vec<String>,
}

/// `src` with every comment (line, block, nested block, doc) and every string, byte string, raw string and char
/// literal replaced by spaces; newlines are kept, so lines still match. Lifetimes (`'a`) are kept.
pub fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        match skipped_until(&c, i) {
            Some(end) => {
                out.extend(
                    c[i..end]
                        .iter()
                        .map(|&ch| if ch == '\n' { '\n' } else { ' ' }),
                );
                i = end;
            }
            None => {
                out.push(c[i]);
                i += 1;
            }
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Where the comment or literal that starts at `i` ends (exclusive); `None` if none starts there.
fn skipped_until(c: &[char], i: usize) -> Option<usize> {
    let at = |k: usize| c.get(k).copied();
    let unterminated = c.len();
    match c[i] {
        '/' if at(i + 1) == Some('/') => Some(
            c[i..]
                .iter()
                .position(|&x| x == '\n')
                .map_or(c.len(), |p| i + p),
        ),
        '/' if at(i + 1) == Some('*') => {
            let (mut depth, mut k) = (0usize, i);
            while k < c.len() {
                if c[k] == '/' && at(k + 1) == Some('*') {
                    depth += 1;
                    k += 2;
                } else if c[k] == '*' && at(k + 1) == Some('/') {
                    depth -= 1;
                    k += 2;
                    if depth == 0 {
                        return Some(k);
                    }
                } else {
                    k += 1;
                }
            }
            Some(unterminated)
        }
        // A plain, byte (`b"`) or C (`c"`) string: the prefix letter stays, harmlessly.
        '"' => {
            let mut k = i + 1;
            while k < c.len() {
                match c[k] {
                    '\\' => k += 2,
                    '"' => return Some(k + 1),
                    _ => k += 1,
                }
            }
            Some(unterminated)
        }
        // `'\n'`, `'\''`, `'\u{1F600}'`; `'x'` (also `'"'`); anything else is a lifetime or a label.
        '\'' if at(i + 1) == Some('\\') => {
            let close = (i + 3..c.len()).find(|&k| c[k] == '\'');
            Some(close.map_or(unterminated, |k| k + 1))
        }
        '\'' if at(i + 2) == Some('\'') => Some(i + 3),
        'r' | 'b' | 'c' if i == 0 || !is_ident(c[i - 1]) => raw_string_until(c, i),
        _ => None,
    }
}

/// `r"…"`, `r#"…"#`, `br##"…"##`, `cr"…"` starting at `i`; `None` for anything else (`r#type` is a raw identifier).
fn raw_string_until(c: &[char], i: usize) -> Option<usize> {
    let at = |k: usize| c.get(k).copied();
    let mut k = i;
    if matches!(c[k], 'b' | 'c') {
        k += 1;
    }
    if at(k) != Some('r') {
        return None;
    }
    k += 1;
    let hashes = c[k..].iter().take_while(|&&x| x == '#').count();
    k += hashes;
    if at(k) != Some('"') {
        return None;
    }
    let closes = |q: usize| c[q] == '"' && (1..=hashes).all(|h| at(q + h) == Some('#'));
    Some(
        (k + 1..c.len())
            .find(|&q| closes(q))
            .map_or(c.len(), |q| q + 1 + hashes),
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Identifiers (a raw `r#name` gives `name`), `::` and single punctuation; numbers are dropped.
fn tokenize(stripped: &str) -> Vec<Token> {
    let c: Vec<char> = stripped.chars().collect();
    let at = |k: usize| c.get(k).copied();
    let word_end = |from: usize| {
        (from..c.len())
            .find(|&k| !is_ident(c[k]))
            .unwrap_or(c.len())
    };
    let (mut out, mut i, mut line) = (Vec::new(), 0, 1);
    while i < c.len() {
        let mut start = i;
        let tok = if is_ident(c[i]) {
            i = word_end(i);
            if c[start..i] == ['r'] && at(i) == Some('#') && at(i + 1).is_some_and(is_ident) {
                start = i + 1;
                i = word_end(start);
            }
            (!c[start].is_ascii_digit()).then(|| Tok::Ident(c[start..i].iter().collect()))
        } else if c[i] == ':' && at(i + 1) == Some(':') {
            i += 2;
            Some(Tok::Sep)
        } else {
            i += 1;
            (!c[start].is_whitespace()).then_some(Tok::Punct(c[start]))
        };
        if let Some(tok) = tok {
            out.push(Token { tok, line });
        }
        line += c[start..i].iter().filter(|&&x| x == '\n').count();
    }
    out
}

/// The child modules that `text` declares (`mod name;`, not inline modules).
pub fn declared_modules(text: &str) -> Vec<String> {
    let toks = tokenize(&strip(text));
    let declared = toks
        .windows(3)
        .filter_map(|w| match (&w[0].tok, &w[1].tok, &w[2].tok) {
            (Tok::Ident(m), Tok::Ident(name), Tok::Punct(';')) if m == "mod" => Some(name.clone()),
            _ => None,
        });
    declared.collect()
}

/// A path as found, before resolution: its segments as written (`"::"` first for `::extern_crate::x`, `"*"`
/// last for a glob).
#[derive(Debug)]
struct Found {
    segs: Vec<String>,
    /// For a `use` leaf: the name it binds (`as` or last segment); `None` for a glob or an expression path.
    binds: Option<String>,
    line: usize,
    /// Names of the inline `mod name { … }` blocks around it, outermost first.
    scope: Vec<String>,
}

/// The paths into the crate that the file `text` names, for a file whose module is `module`; `is_module` says
/// which module paths have a file. `Err` for a `#[path]` attribute, which this reading does not follow.
pub fn references(
    text: &str,
    module: &[String],
    is_module: &dyn Fn(&[String]) -> bool,
) -> Result<Vec<Reference>, String> {
    let toks = tokenize(&strip(text));
    let tok = |k: usize| toks.get(k).map(|t| &t.tok);
    let ident = |k: usize, word: &str| matches!(tok(k), Some(Tok::Ident(w)) if w == word);
    let (mut uses, mut paths) = (Vec::new(), Vec::new());
    let (mut depth, mut scope): (usize, Vec<(String, usize)>) = (0, Vec::new());
    let mut i = 0;
    while i < toks.len() {
        let after_sep_or_dot = i > 0 && matches!(tok(i - 1), Some(Tok::Sep | Tok::Punct('.')));
        let names = || scope.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        match &toks[i].tok {
            Tok::Punct('#') if tok(i + 1) == Some(&Tok::Punct('[')) && ident(i + 2, "path") => {
                return Err(format!(
                    "line {}: #[path] is not followed by this checker",
                    toks[i].line
                ));
            }
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if scope.last().is_some_and(|&(_, d)| d == depth) {
                    scope.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(w) if w == "mod" && tok(i + 2) == Some(&Tok::Punct('{')) => {
                if let Some(Tok::Ident(name)) = tok(i + 1) {
                    scope.push((name.clone(), depth + 1));
                }
                i += 1;
            }
            Tok::Ident(w)
                if w == "use" && !after_sep_or_dot && tok(i + 1) != Some(&Tok::Punct('<')) =>
            {
                i += 1;
                let mut leaves = Vec::new();
                use_tree(&toks, &mut i, Vec::new(), &mut leaves);
                // Past the `;` (and past anything this reading did not expect).
                while i < toks.len() && tok(i) != Some(&Tok::Punct(';')) {
                    i += 1;
                }
                uses.extend(leaves.into_iter().map(|mut f: Found| {
                    f.scope = names();
                    f
                }));
                continue;
            }
            // `pub(in crate::a)` restricts visibility: it uses nothing.
            Tok::Ident(w) if w == "in" && i > 0 && tok(i - 1) == Some(&Tok::Punct('(')) => i += 1,
            Tok::Ident(first) if !after_sep_or_dot => {
                let mut segs = vec![first.clone()];
                while tok(i + 1) == Some(&Tok::Sep) {
                    let Some(Tok::Ident(next)) = tok(i + 2) else {
                        break;
                    };
                    segs.push(next.clone());
                    i += 2;
                }
                if segs.len() > 1 {
                    let (line, scope) = (toks[i].line, names());
                    paths.push(Found {
                        segs,
                        binds: None,
                        line,
                        scope,
                    });
                }
            }
            _ => {}
        }
        i += 1;
    }

    // `use` leaves first (in order), so that what they bind resolves the paths that start with that name.
    let mut bound: HashMap<String, Option<Vec<String>>> = HashMap::new();
    let mut out = Vec::new();
    for found in uses.iter().chain(&paths) {
        let path = resolve(found, module, &bound, is_module);
        if let Some(name) = &found.binds {
            bound.insert(name.clone(), path.clone());
        }
        if let Some(path) = path {
            let text = found.segs.join("::");
            out.push(Reference {
                line: found.line,
                text,
                path,
            });
        }
    }
    Ok(out)
}

/// Parses one use tree at `*i` (after `use`, or inside braces) into `out`; stops at the token after it.
fn use_tree(toks: &[Token], i: &mut usize, mut segs: Vec<String>, out: &mut Vec<Found>) {
    let tok = |k: usize| toks.get(k).map(|t| &t.tok);
    let leaf = |segs, binds, line| Found {
        segs,
        binds,
        line,
        scope: Vec::new(),
    };
    if tok(*i) == Some(&Tok::Punct('$')) {
        *i += 1; // `$crate::…` in a macro
    }
    if segs.is_empty() && tok(*i) == Some(&Tok::Sep) {
        segs.push("::".to_string());
        *i += 1;
    }
    loop {
        match tok(*i) {
            Some(Tok::Ident(w)) => {
                segs.push(w.clone());
                *i += 1;
                if tok(*i) == Some(&Tok::Sep) {
                    *i += 1;
                    continue;
                }
                let mut name = segs.last().cloned();
                if matches!(tok(*i), Some(Tok::Ident(a)) if a == "as") {
                    if let Some(Tok::Ident(alias)) = tok(*i + 1) {
                        name = Some(alias.clone());
                    }
                    *i += 2;
                }
                if segs.last().is_some_and(|s| s == "self") {
                    segs.pop();
                    if name.as_deref() == Some("self") {
                        name = segs.last().cloned();
                    }
                }
                let name = name.filter(|n| n != "_");
                out.push(leaf(segs, name, toks[*i - 1].line));
            }
            Some(Tok::Punct('*')) => {
                segs.push("*".to_string());
                out.push(leaf(segs, None, toks[*i].line));
                *i += 1;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                while *i < toks.len() && !matches!(tok(*i), Some(Tok::Punct('}' | ';'))) {
                    let before = *i;
                    use_tree(toks, i, segs.clone(), out);
                    if tok(*i) == Some(&Tok::Punct(',')) || *i == before {
                        *i += 1;
                    }
                }
                if tok(*i) == Some(&Tok::Punct('}')) {
                    *i += 1;
                }
            }
            _ => {}
        }
        break;
    }
}

/// The path from the crate root that `found` names, if it names something in this crate.
fn resolve(
    found: &Found,
    module: &[String],
    bound: &HashMap<String, Option<Vec<String>>>,
    is_module: &dyn Fn(&[String]) -> bool,
) -> Option<Vec<String>> {
    let segs = &found.segs;
    let here: Vec<String> = module.iter().chain(&found.scope).cloned().collect();
    let join =
        |base: &[String], rest: &[String]| base.iter().chain(rest).cloned().collect::<Vec<_>>();
    match segs.first()?.as_str() {
        "crate" => Some(segs[1..].to_vec()),
        "self" => Some(join(&here, &segs[1..])),
        "super" => {
            let ups = segs.iter().take_while(|s| *s == "super").count();
            let base = here.get(..here.len().checked_sub(ups)?)?;
            Some(join(base, &segs[ups..]))
        }
        "::" | "Self" => None,
        first => {
            if let Some(target) = bound.get(first) {
                return target.as_ref().map(|t| join(t, &segs[1..]));
            }
            // A child module: of the inline module, or of the file's module (reached from an inline
            // `mod tests` through `use super::*`).
            [here.as_slice(), module].into_iter().find_map(|base| {
                let child = join(base, &segs[..1]);
                is_module(&child).then(|| join(base, segs))
            })
        }
    }
}
