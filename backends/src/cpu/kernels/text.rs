//! String and text ops: StringConcat, StringSplit, StringNormalizer, RegexFullMatch (RE2 syntax,
//! run on the `regex` crate after translating the few places where RE2 and Rust syntax differ) and
//! TfIdfVectorizer (n-gram counting over int or string tokens).

use std::collections::HashMap;

use kiln_runtime::{DType, Error, Result, Tensor};

use super::elementwise::{map2_into, Plan};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

fn string_input<'t>(ctx: &OpCtx, inputs: &'t [Option<Tensor>], i: usize) -> Result<&'t Tensor> {
    let t = ctx.input(inputs, i)?;
    if t.dtype() != DType::String {
        return Err(Error::DType(format!("{}: input {i} must be a string tensor, got {:?}", ctx.op(), t.dtype())));
    }
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// StringConcat

fn string_concat(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (string_input(ctx, inputs, 0)?, string_input(ctx, inputs, 1)?);
    let (shape, plan) = Plan::new([a.shape(), b.shape()])?;
    let mut out = vec![String::new(); shape.iter().product()];
    map2_into(&plan, a.strings()?, b.strings()?, &mut out, |x, y| {
        let mut s = String::with_capacity(x.len() + y.len());
        s.push_str(x);
        s.push_str(y);
        s
    });
    Ok(vec![Tensor::from_strings(&shape, out)?])
}

// ---------------------------------------------------------------------------------------------
// StringSplit

/// Whitespace as Python's `str.isspace` sees it (Unicode White_Space plus the ASCII
/// file/group/record/unit separators), which is what the reference splits on.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Split like Python's `str.split(delimiter, maxsplit)`: with no delimiter, runs of whitespace
/// separate and leading/trailing whitespace yields no empty pieces.
fn split_one<'s>(s: &'s str, delimiter: Option<&str>, maxsplit: Option<usize>, parts: &mut Vec<&'s str>) {
    parts.clear();
    match (delimiter, maxsplit) {
        (Some(d), Some(m)) => parts.extend(s.splitn(m.saturating_add(1), d)),
        (Some(d), None) => parts.extend(s.split(d)),
        (None, _) => {
            let mut rest = s.trim_start_matches(is_py_space);
            while !rest.is_empty() {
                if maxsplit == Some(parts.len()) {
                    parts.push(rest);
                    break;
                }
                match rest.find(is_py_space) {
                    Some(i) => {
                        parts.push(&rest[..i]);
                        rest = rest[i..].trim_start_matches(is_py_space);
                    }
                    None => {
                        parts.push(rest);
                        break;
                    }
                }
            }
        }
    }
}

fn string_split(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = string_input(ctx, inputs, 0)?;
    let delimiter = ctx.attr_s_opt("delimiter").filter(|d| !d.is_empty());
    // Absent or negative maxsplit means unlimited, as in Python.
    let maxsplit = ctx.attr_i_opt("maxsplit").and_then(|m| usize::try_from(m).ok());
    let mut parts = Vec::new();
    let split: Vec<Vec<&str>> = x
        .strings()?
        .iter()
        .map(|s| {
            split_one(s, delimiter.as_deref(), maxsplit, &mut parts);
            parts.clone()
        })
        .collect();
    let width = split.iter().map(Vec::len).max().unwrap_or(0);
    let counts: Vec<i64> = split.iter().map(|p| p.len() as i64).collect();
    let mut flat = Vec::with_capacity(split.len() * width);
    for p in &split {
        flat.extend(p.iter().map(|s| s.to_string()));
        flat.resize(flat.len() + width - p.len(), String::new());
    }
    let mut shape = x.shape().to_vec();
    shape.push(width);
    Ok(vec![Tensor::from_strings(&shape, flat)?, Tensor::from_vec(x.shape(), counts)?])
}

// ---------------------------------------------------------------------------------------------
// StringNormalizer

#[derive(Clone, Copy, PartialEq)]
enum CaseChange {
    Lower,
    Upper,
    None,
}

fn string_normalizer(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = string_input(ctx, inputs, 0)?;
    let case = match ctx.attr_s("case_change_action", "NONE").as_str() {
        "LOWER" => CaseChange::Lower,
        "UPPER" => CaseChange::Upper,
        "NONE" => CaseChange::None,
        other => return Err(ctx.unsupported(format!("case_change_action {other:?}"))),
    };
    let case_sensitive = ctx.attr_i("is_case_sensitive", 0) != 0;
    // The locale only matters for case mapping; Unicode default case mapping is used for all.
    let fold = |s: &str| if case_sensitive { s.to_string() } else { s.to_lowercase() };
    let stops: std::collections::HashSet<String> =
        ctx.attr_strings("stopwords").unwrap_or_default().iter().map(|s| fold(s)).collect();
    let shape = x.shape();
    let rank2 = match shape {
        [_] => false,
        [_, _] => true,
        _ => return Err(Error::Shape(format!("StringNormalizer: input must be [C] or [1, C], got {shape:?}"))),
    };
    let kept: Vec<String> = x
        .strings()?
        .iter()
        .filter(|s| stops.is_empty() || !stops.contains(&fold(s)))
        .map(|s| match case {
            CaseChange::Lower => s.to_lowercase(),
            CaseChange::Upper => s.to_uppercase(),
            CaseChange::None => s.clone(),
        })
        .collect();
    if rank2 && shape[0] != 1 {
        // Rows could lose different numbers of elements; only allowed when nothing is dropped.
        if kept.len() != x.len() {
            return Err(Error::Shape(format!("StringNormalizer: stopwords need a [1, C] input, got {shape:?}")));
        }
        return Ok(vec![Tensor::from_strings(shape, kept)?]);
    }
    // All dropped: one empty string, keeping the input's rank.
    let kept = if kept.is_empty() { vec![String::new()] } else { kept };
    let out_shape = if rank2 { vec![1, kept.len()] } else { vec![kept.len()] };
    Ok(vec![Tensor::from_strings(&out_shape, kept)?])
}

// ---------------------------------------------------------------------------------------------
// RegexFullMatch

/// RE2's ASCII Perl classes, as Rust class items (usable inside `[...]`).
fn perl_class_items(c: char) -> Option<(&'static str, bool)> {
    match c {
        'd' => Some(("0-9", false)),
        'D' => Some(("0-9", true)),
        'w' => Some(("0-9A-Za-z_", false)),
        'W' => Some(("0-9A-Za-z_", true)),
        's' => Some((r"\t\n\x0C\r ", false)),
        'S' => Some((r"\t\n\x0C\r ", true)),
        _ => None,
    }
}

/// Rewrite an RE2 pattern into Rust `regex` syntax. The languages mostly agree; the differences
/// handled are: RE2's `\d \w \s \b` are ASCII-only (Rust's are Unicode), `\Q...\E` quoting, and
/// inside a class RE2 treats `[` (unless `[:name:]`), `&` and `~` as literals where Rust reads
/// nested classes and set operations.
fn re2_to_rust(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut in_class = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '\\' if i < chars.len() => {
                let n = chars[i];
                i += 1;
                if let Some((items, negated)) = perl_class_items(n) {
                    match (in_class, negated) {
                        (true, false) => out.push_str(items),
                        _ => {
                            out.push_str(if negated { "[^" } else { "[" });
                            out.push_str(items);
                            out.push(']');
                        }
                    }
                } else if (n == 'b' || n == 'B') && !in_class {
                    out.push_str(if n == 'b' { r"(?-u:\b)" } else { r"(?-u:\B)" });
                } else if n == 'Q' {
                    let mut lit = String::new();
                    while i < chars.len() && !(chars[i] == '\\' && chars.get(i + 1) == Some(&'E')) {
                        lit.push(chars[i]);
                        i += 1;
                    }
                    i = (i + 2).min(chars.len());
                    for ch in lit.chars() {
                        if ch.is_ascii_punctuation() {
                            out.push('\\');
                        }
                        out.push(ch);
                    }
                } else {
                    out.push('\\');
                    out.push(n);
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
                if chars.get(i) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                // A leading ']' is a literal in both syntaxes; escape it to be unambiguous.
                if chars.get(i) == Some(&']') {
                    out.push_str(r"\]");
                    i += 1;
                }
            }
            '[' if chars.get(i) == Some(&':') => {
                // A POSIX class item `[:name:]` (or `[:^name:]`): copy through its `:]`.
                out.push('[');
                while i < chars.len() {
                    out.push(chars[i]);
                    i += 1;
                    if chars[i - 1] == ':' && chars.get(i) == Some(&']') && out.len() > 2 {
                        out.push(']');
                        i += 1;
                        break;
                    }
                }
            }
            '[' | '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Compile an RE2 pattern for whole-string matching.
fn compile_full_match(pattern: &str) -> Result<regex::Regex> {
    let translated = re2_to_rust(pattern);
    let build = |p: &str| regex::RegexBuilder::new(p).octal(true).build();
    // Compile the bare pattern first so that an unbalanced ')' cannot pair with our wrapper.
    build(&translated)
        .and_then(|_| build(&format!(r"\A(?:{translated})\z")))
        .map_err(|e| Error::Other(format!("RegexFullMatch: invalid pattern {pattern:?}: {e}")))
}

fn regex_full_match(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = string_input(ctx, inputs, 0)?;
    let pattern = ctx
        .attr_s_opt("pattern")
        .ok_or_else(|| Error::Other("RegexFullMatch: the pattern attribute is required".into()))?;
    let re = compile_full_match(&pattern)?;
    let mut out = Tensor::zeros(DType::Bool, x.shape());
    let o = out.view_mut::<bool>()?;
    let strs = x.strings()?;
    crate::cpu::par::chunks_mut(o, 64, |c, oc| {
        for (o, s) in oc.iter_mut().zip(&strs[c * 64..]) {
            *o = re.is_match(s);
        }
    });
    Ok(vec![out])
}

// ---------------------------------------------------------------------------------------------
// TfIdfVectorizer

/// Token id of an input element absent from the pool: matches nothing.
const UNKNOWN: u32 = u32::MAX;
/// Output column of a trie node that ends no pooled n-gram.
const NO_COL: usize = usize::MAX;

/// The pooled n-grams as a trie over interned token ids. Node 0 is the root.
struct NgramTrie {
    edges: HashMap<(u32, u32), u32>,
    /// Output column counted when an n-gram ends at this node.
    col: Vec<usize>,
    has_children: Vec<bool>,
}

impl NgramTrie {
    fn new() -> NgramTrie {
        NgramTrie { edges: HashMap::new(), col: vec![NO_COL], has_children: vec![false] }
    }

    fn insert(&mut self, gram: &[u32], col: usize) {
        let mut node = 0u32;
        for &tok in gram {
            let next = self.col.len() as u32;
            let child = *self.edges.entry((node, tok)).or_insert(next);
            if child == next {
                self.col.push(NO_COL);
                self.has_children.push(false);
            }
            self.has_children[node as usize] = true;
            node = child;
        }
        self.col[node as usize] = col;
    }

    fn child(&self, node: u32, tok: u32) -> Option<u32> {
        self.edges.get(&(node, tok)).copied()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Weighting {
    Tf,
    Idf,
    TfIdf,
}

struct TfIdf {
    trie: NgramTrie,
    min_len: usize,
    max_len: usize,
    max_skip: usize,
    out_size: usize,
    mode: Weighting,
    weights: Vec<f32>,
}

/// Read an attribute that must be a non-negative integer.
fn attr_usize(ctx: &OpCtx, name: &str) -> Result<usize> {
    let v = ctx.attr_i_opt(name).ok_or_else(|| Error::Other(format!("TfIdfVectorizer: {name} is required")))?;
    usize::try_from(v).map_err(|_| Error::Other(format!("TfIdfVectorizer: {name} must be >= 0, got {v}")))
}

impl TfIdf {
    /// Build from the attributes; `pool` holds the pool's token ids.
    fn new(ctx: &OpCtx, pool: &[u32]) -> Result<TfIdf> {
        let bad = |m: String| Error::Other(format!("TfIdfVectorizer: {m}"));
        let mode = match ctx.attr_s("mode", "").as_str() {
            "TF" => Weighting::Tf,
            "IDF" => Weighting::Idf,
            "TFIDF" => Weighting::TfIdf,
            other => return Err(ctx.unsupported(format!("mode {other:?}"))),
        };
        let (min_len, max_len) = (attr_usize(ctx, "min_gram_length")?, attr_usize(ctx, "max_gram_length")?);
        if min_len == 0 {
            return Err(bad("min_gram_length must be >= 1".into()));
        }
        let max_skip = attr_usize(ctx, "max_skip_count")?;
        let indexes = ctx.attr_ints("ngram_indexes").unwrap_or_default();
        let counts = ctx.attr_ints("ngram_counts").unwrap_or_default();
        let out_size = match indexes.iter().max() {
            Some(&m) if indexes.iter().all(|&i| i >= 0) => m as usize + 1,
            _ => return Err(bad(format!("ngram_indexes must be non-empty and >= 0, got {indexes:?}"))),
        };
        let weights = ctx.attr_floats("weights").unwrap_or_default();
        if !weights.is_empty() && weights.len() < out_size {
            return Err(bad(format!("{} weights for {out_size} outputs", weights.len())));
        }
        let mut trie = NgramTrie::new();
        // N-grams are numbered over the whole pool, sizes outside [min, max] included.
        let mut ngram = 0usize;
        for (k, &start) in counts.iter().enumerate() {
            let end = counts.get(k + 1).copied().unwrap_or(pool.len() as i64);
            if start < 0 || end < start || end as usize > pool.len() {
                return Err(bad(format!("ngram_counts {counts:?} do not fit a pool of {}", pool.len())));
            }
            let size = k + 1;
            let grams = pool[start as usize..end as usize].chunks_exact(size);
            if size < min_len || size > max_len {
                ngram += grams.len();
                continue;
            }
            for gram in grams {
                let col = *indexes.get(ngram).ok_or_else(|| bad(format!("no ngram_indexes entry for n-gram {ngram}")))?;
                trie.insert(gram, col as usize);
                ngram += 1;
            }
        }
        Ok(TfIdf { trie, min_len, max_len, max_skip, out_size, mode, weights })
    }

    /// Count the pooled n-grams of one row of token ids into `freq` (one slot per column).
    /// Unigrams are counted once; longer n-grams once per skip distance 1..=max_skip+1.
    fn count_row(&self, toks: &[u32], freq: &mut [f32]) {
        let n = toks.len();
        let mut start_len = self.min_len;
        for skip in 1..=self.max_skip + 1 {
            for start in 0..n {
                if start + skip * (start_len - 1) >= n {
                    break;
                }
                let (mut node, mut len, mut item) = (0u32, 1usize, start);
                while self.trie.has_children[node as usize] && len <= self.max_len && item < n {
                    let Some(child) = self.trie.child(node, toks[item]) else { break };
                    let col = self.trie.col[child as usize];
                    if len >= start_len && col != NO_COL {
                        freq[col] += 1.0;
                    }
                    node = child;
                    len += 1;
                    item += skip;
                }
            }
            if start_len == 1 {
                start_len = 2;
                if start_len > self.max_len {
                    break;
                }
            }
        }
    }

    fn weigh(&self, freq: &mut [f32]) {
        let w = &self.weights;
        match (self.mode, w.is_empty()) {
            (Weighting::Tf, _) | (Weighting::TfIdf, true) => {}
            (Weighting::Idf, true) => freq.iter_mut().for_each(|f| *f = if *f > 0.0 { 1.0 } else { 0.0 }),
            (Weighting::Idf, false) => {
                freq.iter_mut().zip(w).for_each(|(f, w)| *f = if *f > 0.0 { *w } else { 0.0 })
            }
            (Weighting::TfIdf, false) => freq.iter_mut().zip(w).for_each(|(f, w)| *f *= w),
        }
    }
}

/// The id of `key`, numbering new keys in order of first appearance.
fn intern<K: std::hash::Hash + Eq>(ids: &mut HashMap<K, u32>, key: K) -> u32 {
    let next = ids.len() as u32;
    *ids.entry(key).or_insert(next)
}

/// Intern the pool's tokens and map the input onto the same ids (`UNKNOWN` if not pooled).
fn tokenize(ctx: &OpCtx, x: &Tensor) -> Result<(Vec<u32>, Vec<u32>)> {
    let pool_ints = ctx.attr_ints("pool_int64s").unwrap_or_default();
    let pool_strs = ctx.attr_strings("pool_strings").unwrap_or_default();
    match x.dtype() {
        DType::I32 | DType::I64 if pool_strs.is_empty() || !pool_ints.is_empty() => {
            let mut ids: HashMap<i64, u32> = HashMap::new();
            let pool = pool_ints.iter().map(|&v| intern(&mut ids, v)).collect();
            let input = x.to_i64_vec()?.iter().map(|v| ids.get(v).copied().unwrap_or(UNKNOWN)).collect();
            Ok((pool, input))
        }
        DType::String if pool_ints.is_empty() => {
            let mut ids: HashMap<&str, u32> = HashMap::new();
            let pool = pool_strs.iter().map(|v| intern(&mut ids, v.as_str())).collect();
            let input = x.strings()?.iter().map(|v| ids.get(v.as_str()).copied().unwrap_or(UNKNOWN)).collect();
            Ok((pool, input))
        }
        dt => Err(Error::DType(format!(
            "TfIdfVectorizer: input {dt:?} does not match the pool (pool_int64s needs int32/int64, pool_strings needs string)"
        ))),
    }
}

fn tfidf_vectorizer(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (pool, toks) = tokenize(ctx, x)?;
    let v = TfIdf::new(ctx, &pool)?;
    let (rows, row_len, out_shape) = match *x.shape() {
        [] => (1, 1, vec![v.out_size]),
        [c] => (1, c, vec![v.out_size]),
        [b, c] => (b, c, vec![b, v.out_size]),
        ref s => return Err(Error::Shape(format!("TfIdfVectorizer: input must be [C] or [B, C], got {s:?}"))),
    };
    let mut out = Tensor::zeros(DType::F32, &out_shape);
    let o = out.view_mut::<f32>()?;
    crate::cpu::par::chunks_mut(o, v.out_size, |r, freq| {
        if row_len > 0 {
            v.count_row(&toks[r * row_len..(r + 1) * row_len], freq);
        }
        v.weigh(freq);
    });
    debug_assert_eq!(rows * v.out_size, o.len());
    Ok(vec![out])
}

pub fn register(r: &mut Registry) {
    r.add("StringConcat", string_concat);
    r.add("StringSplit", string_split);
    r.add("StringNormalizer", string_normalizer);
    r.add("RegexFullMatch", regex_full_match);
    r.add("TfIdfVectorizer", tfidf_vectorizer);
}

#[cfg(test)]
mod tests {
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    use super::*;
    use crate::cpu::registry::TensorKernel;

    fn attr(name: &str, kind: AttrKind) -> Attr {
        Attr { name: name.into(), kind: kind as i32, ..Default::default() }
    }
    fn a_i(name: &str, i: i64) -> Attr {
        Attr { i, ..attr(name, AttrKind::Int) }
    }
    fn a_s(name: &str, s: &str) -> Attr {
        Attr { s: s.as_bytes().to_vec(), ..attr(name, AttrKind::String) }
    }
    fn a_ints(name: &str, ints: &[i64]) -> Attr {
        Attr { ints: ints.to_vec(), ..attr(name, AttrKind::Ints) }
    }
    fn a_floats(name: &str, floats: &[f32]) -> Attr {
        Attr { floats: floats.to_vec(), ..attr(name, AttrKind::Floats) }
    }
    fn a_strs(name: &str, strs: &[&str]) -> Attr {
        Attr { strings: strs.iter().map(|s| s.as_bytes().to_vec()).collect(), ..attr(name, AttrKind::Strings) }
    }

    fn run(k: TensorKernel, attrs: Vec<Attr>, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let step = Step { op: "T".into(), opset: 20, outputs: vec![0, 1], attrs, ..Default::default() };
        k(&OpCtx::new(&step, None), &inputs.into_iter().map(Some).collect::<Vec<_>>())
    }
    fn strs(shape: &[usize], v: &[&str]) -> Tensor {
        Tensor::from_strings(shape, v.iter().map(|s| s.to_string()).collect()).unwrap()
    }
    fn got_strs(t: &Tensor) -> Vec<&str> {
        t.strings().unwrap().iter().map(String::as_str).collect()
    }

    #[test]
    fn concat_broadcasts() {
        let out = run(string_concat, vec![], vec![strs(&[2, 1], &["a", "b"]), strs(&[3], &["x", "", "é"])]).unwrap();
        assert_eq!(out[0].shape(), &[2, 3]);
        assert_eq!(got_strs(&out[0]), ["ax", "a", "aé", "bx", "b", "bé"]);
        let out = run(string_concat, vec![], vec![strs(&[], &["cat"]), strs(&[], &["s"])]).unwrap();
        assert_eq!((out[0].shape(), got_strs(&out[0])), (&[][..], vec!["cats"]));
    }

    fn split(attrs: Vec<Attr>, x: &[&str]) -> (Vec<usize>, Vec<String>, Vec<i64>) {
        let out = run(string_split, attrs, vec![strs(&[x.len()], x)]).unwrap();
        (out[0].shape().to_vec(), out[0].strings().unwrap().to_vec(), out[1].to_i64_vec().unwrap())
    }

    #[test]
    fn split_on_whitespace_runs_with_maxsplit() {
        let (shape, s, n) = split(vec![a_i("maxsplit", 1)], &["  a  b  c  ", "", "x"]);
        assert_eq!(shape, [3, 2]);
        assert_eq!(s, ["a", "b  c  ", "", "", "x", ""]);
        assert_eq!(n, [2, 0, 1]);
        // An empty delimiter also means whitespace; maxsplit 0 keeps the (left-stripped) string.
        let (_, s, n) = split(vec![a_s("delimiter", ""), a_i("maxsplit", 0)], &[" a b "]);
        assert_eq!((s, n), (vec!["a b ".to_string()], vec![1]));
    }

    #[test]
    fn split_on_delimiter_keeps_empty_pieces() {
        let (shape, s, n) = split(vec![a_s("delimiter", "ab")], &["xabyab", "", "q"]);
        assert_eq!(shape, [3, 3]);
        assert_eq!(s, ["x", "y", "", "", "", "", "q", "", ""]);
        assert_eq!(n, [3, 1, 1]);
        let (_, s, n) = split(vec![a_s("delimiter", ","), a_i("maxsplit", 1)], &["a,b,c"]);
        assert_eq!((s, n), (vec!["a".to_string(), "b,c".to_string()], vec![2]));
        let (shape, s, n) = split(vec![], &[]);
        assert_eq!((shape, s.len(), n.len()), (vec![0, 0], 0, 0));
    }

    #[test]
    fn normalizer_drops_stopwords_then_changes_case() {
        let attrs = vec![a_s("case_change_action", "LOWER"), a_strs("stopwords", &["The"])];
        let out = run(string_normalizer, attrs, vec![strs(&[4], &["the", "A", "THE", "Cat"])]).unwrap();
        assert_eq!((out[0].shape(), got_strs(&out[0])), (&[2][..], vec!["a", "cat"]));
        // Case-sensitive: only the exact spelling is a stopword.
        let attrs = vec![a_i("is_case_sensitive", 1), a_strs("stopwords", &["The"]), a_s("case_change_action", "UPPER")];
        let out = run(string_normalizer, attrs, vec![strs(&[1, 3], &["the", "The", "ß"])]).unwrap();
        assert_eq!((out[0].shape(), got_strs(&out[0])), (&[1, 2][..], vec!["THE", "SS"]));
    }

    #[test]
    fn normalizer_all_dropped_gives_one_empty_string() {
        let attrs = || vec![a_strs("stopwords", &["monday"])];
        let out = run(string_normalizer, attrs(), vec![strs(&[1, 2], &["Monday", "monday"])]).unwrap();
        assert_eq!((out[0].shape(), got_strs(&out[0])), (&[1, 1][..], vec![""]));
        let out = run(string_normalizer, attrs(), vec![strs(&[1], &["MONDAY"])]).unwrap();
        assert_eq!((out[0].shape(), got_strs(&out[0])), (&[1][..], vec![""]));
        assert!(run(string_normalizer, attrs(), vec![strs(&[1, 1, 1], &["x"])]).is_err());
        assert!(run(string_normalizer, vec![a_s("case_change_action", "TITLE")], vec![strs(&[1], &["x"])]).is_err());
    }

    fn full_match(pattern: &str, x: &[&str]) -> Result<Vec<bool>> {
        let out = run(regex_full_match, vec![a_s("pattern", pattern)], vec![strs(&[x.len()], x)])?;
        Ok(out[0].view::<bool>()?.to_vec())
    }

    #[test]
    fn regex_is_anchored_and_re2_flavoured() {
        assert_eq!(full_match("a|b", &["ab", "b", "ba"]).unwrap(), [false, true, false]);
        // RE2's \w, \d, \b are ASCII; `.` and negated classes match whole code points.
        assert_eq!(full_match(r"\w+", &["hello_1", "héllo"]).unwrap(), [true, false]);
        assert_eq!(full_match(r"\W.", &["éé", "aé"]).unwrap(), [true, false]);
        assert_eq!(full_match(r"[^\d]\bfoo\b", &[" foo", "5foo"]).unwrap(), [true, false]);
        assert_eq!(full_match(r"[\w-]+", &["a-b", "a b"]).unwrap(), [true, false]);
        // Inside a class '[', '&' and '~' are literals in RE2; POSIX classes still work.
        assert_eq!(full_match("[a[&~]+", &["a[&~", "b"]).unwrap(), [true, false]);
        assert_eq!(full_match("[[:digit:]x]+", &["1x2", "1y"]).unwrap(), [true, false]);
        assert_eq!(full_match(r"[]a]+", &["]a"]).unwrap(), [true]);
        assert_eq!(full_match(r"\Qa.b\E+", &["a.bb", "axb"]).unwrap(), [true, false]);
        assert_eq!(full_match(r"(?i)abc", &["AbC"]).unwrap(), [true]);
    }

    #[test]
    fn regex_invalid_pattern_is_an_error() {
        for p in ["a)(b", "(", "[a", r"a\", "a{2,1}"] {
            assert!(full_match(p, &["a"]).is_err(), "{p}");
        }
        assert!(run(regex_full_match, vec![], vec![strs(&[1], &["a"])]).is_err());
    }

    fn tfidf(attrs: Vec<Attr>, x: Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
        let out = run(tfidf_vectorizer, attrs, vec![x])?;
        Ok((out[0].shape().to_vec(), out[0].view::<f32>()?.to_vec()))
    }

    fn bigram_attrs(skip: i64) -> Vec<Attr> {
        vec![
            a_s("mode", "TF"),
            a_i("min_gram_length", 2),
            a_i("max_gram_length", 2),
            a_i("max_skip_count", skip),
            a_ints("ngram_counts", &[0, 0]),
            a_ints("ngram_indexes", &[0, 1, 2, 3]),
            a_ints("pool_int64s", &[94, 12, 17, 36, 36, 28, 5, 6]),
        ]
    }

    #[test]
    fn tfidf_counts_skip_grams() {
        // The spec's example: [94, 12] is a 2-gram at skip 2 (distance 3), [36, 28] at skip 1.
        let x = || Tensor::from_vec(&[5], vec![94i64, 17, 36, 12, 28]).unwrap();
        assert_eq!(tfidf(bigram_attrs(2), x()).unwrap(), (vec![4], vec![1.0, 1.0, 1.0, 0.0]));
        assert_eq!(tfidf(bigram_attrs(1), x()).unwrap(), (vec![4], vec![0.0, 1.0, 1.0, 0.0]));
        assert_eq!(tfidf(bigram_attrs(0), x()).unwrap(), (vec![4], vec![0.0, 1.0, 0.0, 0.0]));
    }

    fn mixed_attrs(mode: &str, weights: &[f32]) -> Vec<Attr> {
        // Unigrams 17 -> col 3, 36 -> col 2; bigram [94, 12] -> col 1; col 0 never hit.
        let mut a = vec![
            a_s("mode", mode),
            a_i("min_gram_length", 1),
            a_i("max_gram_length", 2),
            a_i("max_skip_count", 2),
            a_ints("ngram_counts", &[0, 2]),
            a_ints("ngram_indexes", &[3, 2, 1]),
            a_ints("pool_int64s", &[17, 36, 94, 12]),
        ];
        if !weights.is_empty() {
            a.push(a_floats("weights", weights));
        }
        a
    }

    #[test]
    fn tfidf_modes_and_weights() {
        // Unigrams count once whatever the skip: 17 twice, 36 once; [94, 12] once (distance 3).
        let x = || Tensor::from_vec(&[6], vec![94i32, 17, 36, 12, 28, 17]).unwrap();
        let w = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(tfidf(mixed_attrs("TF", &w), x()).unwrap().1, [0.0, 1.0, 1.0, 2.0]);
        assert_eq!(tfidf(mixed_attrs("TFIDF", &w), x()).unwrap().1, [0.0, 2.0, 3.0, 8.0]);
        assert_eq!(tfidf(mixed_attrs("IDF", &w), x()).unwrap().1, [0.0, 2.0, 3.0, 4.0]);
        assert_eq!(tfidf(mixed_attrs("IDF", &[]), x()).unwrap().1, [0.0, 1.0, 1.0, 1.0]);
        assert!(tfidf(mixed_attrs("TF", &[1.0]), x()).is_err());
        assert!(tfidf(mixed_attrs("TF", &[]), strs(&[1], &["17"])).is_err());
    }

    #[test]
    fn tfidf_string_pool_per_row() {
        // Pool: unigram "a" -> col 1; bigram ["b", "a"] -> col 0 (the trailing "c" is no 2-gram).
        let attrs = vec![
            a_s("mode", "TF"),
            a_i("min_gram_length", 1),
            a_i("max_gram_length", 2),
            a_i("max_skip_count", 0),
            a_ints("ngram_counts", &[0, 1]),
            a_ints("ngram_indexes", &[1, 0]),
            a_strs("pool_strings", &["a", "b", "a", "c"]),
        ];
        let x = strs(&[2, 3], &["b", "a", "a", "x", "b", "a"]);
        assert_eq!(tfidf(attrs.clone(), x).unwrap(), (vec![2, 2], vec![1.0, 2.0, 1.0, 1.0]));
        let empty = strs(&[0], &[]);
        assert_eq!(tfidf(attrs, empty).unwrap(), (vec![2], vec![0.0, 0.0]));
    }
}
