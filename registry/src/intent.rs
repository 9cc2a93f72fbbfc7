//! Lexical intent matching: which agents fit "summarize this invoice"?
//!
//! Owns: the tokenizer (lowercase, split on non-alphanumerics, stopwords,
//! light suffix stemming), the [`Scorer`] trait the registry indexes agents
//! through, and its default implementation [`Bm25`].
//!
//! Why it is shaped so: intent routing must work offline, without a model,
//! in microseconds, and explain itself; BM25 over skill text does that and is
//! the baseline any semantic scorer has to beat. The trait is the seam for
//! one: the registry only hands it [`Document`]s and asks ranked questions.
//!
//! Granularity: one document per *agent* (all its skills plus the card
//! description), scored BM25F-style: each field's term counts are multiplied
//! by a field weight (tags x3, skill names and ids x2, descriptions and
//! examples x1) before the BM25 saturation, so a tag hit outweighs a word in
//! a long description. A query that contains every word of one of the
//! agent's tags gets an extra [`TAG_MATCH_BONUS`] per such tag. Selection
//! picks agents, not skills, so agent granularity avoids a max-aggregation
//! step; the price is that an agent with many skills has a longer document,
//! which BM25's length normalisation (b = 0.75) partly penalises.
//!
//! Tenant scoping is the registry's job: it keeps one scorer per tenant, so a
//! query never sees, and corpus statistics are never influenced by, another
//! tenant's agents.

use std::collections::HashMap;

use crate::fx::FxBuild;

/// Identifier of a document inside one scorer (the registry's slot index).
pub type DocId = u32;

/// Added to an agent's score for each of its tags whose words all occur in the query.
pub const TAG_MATCH_BONUS: f32 = 1.0;

/// Where a piece of text came from; decides its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldKind {
    Tag,
    SkillName,
    SkillId,
    SkillDescription,
    Example,
    CardDescription,
}

impl FieldKind {
    pub fn weight(self) -> f32 {
        match self {
            FieldKind::Tag => 3.0,
            FieldKind::SkillName | FieldKind::SkillId => 2.0,
            FieldKind::SkillDescription | FieldKind::Example | FieldKind::CardDescription => 1.0,
        }
    }
}

/// The text of one agent, field by field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Document {
    pub fields: Vec<(FieldKind, String)>,
}

impl Document {
    pub fn push(&mut self, kind: FieldKind, text: impl Into<String>) {
        self.fields.push((kind, text.into()));
    }
}

/// A ranked text index over documents. Implementations must be deterministic
/// (equal scores ordered by ascending `DocId`).
pub trait Scorer: Send + Sync {
    /// Adds `doc`, replacing any earlier version of it.
    fn index(&mut self, doc: DocId, document: &Document);
    /// Forgets `doc` (no-op if unknown).
    fn remove(&mut self, doc: DocId);
    /// Documents matching `text`, best first, at most `limit`, scores > 0.
    fn query(&self, text: &str, limit: usize) -> Vec<(DocId, f32)>;
    /// Number of indexed documents.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sorted (looked up by binary search).
const STOPWORDS: &[&str] = &[
    "a", "about", "all", "an", "and", "any", "are", "as", "at", "be", "by", "can", "could", "do",
    "does", "for", "from", "have", "how", "i", "in", "into", "is", "it", "its", "me", "my", "of",
    "on", "or", "our", "please", "should", "some", "that", "the", "these", "this", "those", "to",
    "us", "was", "we", "were", "what", "which", "who", "will", "with", "would", "you", "your",
];

/// Suffix rules, first match wins, applied only if at least 3 characters
/// remain before the replacement. Chosen so inflections meet: invoice /
/// invoices -> `invoic`; summarize / summarizing / summarizes /
/// summarization -> `summariz`; translate / translation -> `translat`.
const SUFFIXES: &[(&str, &str)] = &[
    ("izations", "iz"),
    ("ization", "iz"),
    ("isations", "is"),
    ("isation", "is"),
    ("ations", "at"),
    ("ation", "at"),
    ("ings", ""),
    ("ing", ""),
    ("ies", "y"),
    ("ied", "y"),
    ("es", ""),
    ("ed", ""),
    ("s", ""),
    ("e", ""),
];

/// Light stemmer for one lowercase word.
pub fn stem(word: &str) -> String {
    for (suffix, repl) in SUFFIXES {
        if let Some(base) = word.strip_suffix(suffix) {
            // "class" is not the plural of "clas"
            if *suffix == "s" && base.ends_with('s') {
                continue;
            }
            if base.chars().count() >= 3 {
                return format!("{base}{repl}");
            }
        }
    }
    word.to_string()
}

/// Lowercase, split on non-alphanumerics, drop stopwords and one-letter
/// tokens, stem.
pub fn tokenize(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .filter(|t| t.chars().count() > 1 && STOPWORDS.binary_search(&t.as_str()).is_err())
        .map(|t| stem(&t))
        .collect()
}

struct DocInfo {
    /// Weighted length (sum of weighted term counts).
    len: f32,
    terms: Vec<u32>,
}

/// Tags per document that can earn the exact-tag bonus (the first ones
/// with 1..=15 distinct words; later tags still count through their words).
const BONUS_TAGS: usize = 8;

/// One document in a term's postings. Everything a query needs about the
/// document is here, so a query reads postings only (contiguous) and never
/// looks a document up (a cache miss each, which dominated query time).
#[derive(Debug, Clone, Copy)]
struct Posting {
    doc: DocId,
    /// Weighted term frequency.
    tf: f32,
    /// Weighted document length.
    len: f32,
    /// Bit j: the document's bonus tag j contains this term.
    tag_mask: u8,
    /// Distinct words of bonus tag j in bits 4j..4j+4 (0: no tag j).
    tag_sizes: u32,
}

/// Okapi BM25 (BM25F field weights) over an inverted index: a query touches
/// only the postings of its own terms. Terms are numbered; postings are
/// vectors by term number.
pub struct Bm25 {
    k1: f32,
    b: f32,
    /// Term -> number. Keyed by text from cards (outside input), so it keeps
    /// std's DoS-resistant hasher.
    term_ids: HashMap<String, u32>,
    /// Number -> term, to forget a term whose last document left.
    term_names: Vec<String>,
    postings: Vec<Vec<Posting>>,
    free_terms: Vec<u32>,
    docs: HashMap<DocId, DocInfo, FxBuild>,
    total_len: f64,
}

impl Default for Bm25 {
    fn default() -> Self {
        Bm25::new(1.2, 0.75)
    }
}

impl Bm25 {
    pub fn new(k1: f32, b: f32) -> Bm25 {
        Bm25 {
            k1,
            b,
            term_ids: HashMap::new(),
            term_names: Vec::new(),
            postings: Vec::new(),
            free_terms: Vec::new(),
            docs: HashMap::default(),
            total_len: 0.0,
        }
    }

    fn term_id(&mut self, term: &str) -> u32 {
        if let Some(&id) = self.term_ids.get(term) {
            return id;
        }
        let id = match self.free_terms.pop() {
            Some(id) => {
                if let Some(n) = self.term_names.get_mut(id as usize) {
                    *n = term.to_string();
                }
                id
            }
            None => {
                self.postings.push(Vec::new());
                self.term_names.push(term.to_string());
                u32::try_from(self.postings.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.term_ids.insert(term.to_string(), id);
        id
    }
}

impl Scorer for Bm25 {
    fn index(&mut self, doc: DocId, document: &Document) {
        self.remove(doc);
        let mut tf: HashMap<u32, f32, FxBuild> = HashMap::default();
        let mut tags: Vec<Vec<u32>> = Vec::new();
        for (kind, text) in &document.fields {
            let tokens = tokenize(text);
            let mut ids: Vec<u32> = tokens.iter().map(|t| self.term_id(t)).collect();
            for &id in &ids {
                *tf.entry(id).or_insert(0.0) += kind.weight();
            }
            ids.sort_unstable();
            ids.dedup();
            if *kind == FieldKind::Tag
                && (1..16).contains(&ids.len())
                && tags.len() < BONUS_TAGS
                && !tags.contains(&ids)
            {
                tags.push(ids);
            }
        }
        let tag_sizes = tags
            .iter()
            .enumerate()
            .fold(0u32, |acc, (j, t)| acc | ((t.len() as u32) << (4 * j)));
        let len: f32 = tf.values().sum();
        let mut terms = Vec::with_capacity(tf.len());
        for (term, w) in tf {
            let tag_mask = tags
                .iter()
                .enumerate()
                .filter(|(_, t)| t.contains(&term))
                .fold(0u8, |acc, (j, _)| acc | (1 << j));
            if let Some(p) = self.postings.get_mut(term as usize) {
                p.push(Posting {
                    doc,
                    tf: w,
                    len,
                    tag_mask,
                    tag_sizes,
                });
            }
            terms.push(term);
        }
        self.total_len += f64::from(len);
        self.docs.insert(doc, DocInfo { len, terms });
    }

    fn remove(&mut self, doc: DocId) {
        let Some(info) = self.docs.remove(&doc) else {
            return;
        };
        self.total_len -= f64::from(info.len);
        if self.docs.is_empty() {
            self.total_len = 0.0; // no float drift across churn
        }
        for t in info.terms {
            let Some(p) = self.postings.get_mut(t as usize) else {
                continue;
            };
            // Linear in the term's document frequency, within one tenant.
            if let Some(pos) = p.iter().position(|x| x.doc == doc) {
                p.swap_remove(pos);
            }
            if p.is_empty() {
                if let Some(name) = self.term_names.get_mut(t as usize) {
                    self.term_ids.remove(name.as_str());
                    name.clear();
                }
                self.free_terms.push(t);
            }
        }
    }

    fn query(&self, text: &str, limit: usize) -> Vec<(DocId, f32)> {
        let n = self.docs.len();
        if n == 0 || limit == 0 {
            return Vec::new();
        }
        let mut terms: Vec<u32> = tokenize(text)
            .iter()
            .filter_map(|t| self.term_ids.get(t.as_str()).copied())
            .collect();
        terms.sort_unstable();
        terms.dedup();
        let avg = (self.total_len / n as f64).max(1e-6) as f32;
        // doc -> (score, per bonus tag: query terms seen in it, 4 bits each, sizes)
        let hits: usize = terms
            .iter()
            .filter_map(|&t| self.postings.get(t as usize))
            .map(Vec::len)
            .sum();
        let mut scores: HashMap<DocId, (f32, u32, u32), FxBuild> =
            HashMap::with_capacity_and_hasher(hits.min(n), FxBuild::default());
        for &t in &terms {
            let Some(post) = self.postings.get(t as usize) else {
                continue;
            };
            let df = post.len() as f32;
            let idf = (1.0 + (n as f32 - df + 0.5) / (df + 0.5)).ln();
            for p in post {
                let norm = self.k1 * (1.0 - self.b + self.b * p.len / avg);
                let e = scores.entry(p.doc).or_insert((0.0, 0, p.tag_sizes));
                e.0 += idf * p.tf * (self.k1 + 1.0) / (p.tf + norm);
                // terms are distinct, so per tag this counts distinct words
                for j in 0..BONUS_TAGS {
                    if p.tag_mask & (1 << j) != 0 {
                        e.1 += 1 << (4 * j);
                    }
                }
            }
        }
        let mut ranked: Vec<(DocId, f32)> = scores
            .into_iter()
            .map(|(doc, (s, seen, sizes))| {
                let exact = (0..BONUS_TAGS)
                    .filter(|j| {
                        let size = (sizes >> (4 * j)) & 0xf;
                        size > 0 && (seen >> (4 * j)) & 0xf == size
                    })
                    .count();
                (doc, s + TAG_MATCH_BONUS * exact as f32)
            })
            .filter(|(_, s)| *s > 0.0)
            .collect();
        let order = |a: &(DocId, f32), b: &(DocId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if ranked.len() > limit {
            // only the best `limit` need sorting
            ranked.select_nth_unstable_by(limit - 1, order);
            ranked.truncate(limit);
        }
        ranked.sort_unstable_by(order);
        ranked
    }

    fn len(&self) -> usize {
        self.docs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_meet() {
        for (a, b) in [
            ("invoices", "invoice"),
            ("summarize", "summarizing"),
            ("summarize", "summarization"),
            ("summarize", "summarized"),
            ("translate", "translation"),
            ("queries", "query"),
            ("processes", "processing"),
            ("uses", "use"),
        ] {
            assert_eq!(stem(a), stem(b), "{a} vs {b}");
        }
        assert_eq!(stem("class"), "class");
        assert_eq!(stem("bed"), "bed");
        assert_ne!(stem("invoice"), stem("voice"));
    }

    #[test]
    fn stopwords_are_sorted() {
        assert!(STOPWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn multi_word_tags_need_every_word_for_the_bonus() {
        let mut s = Bm25::default();
        s.index(1, &doc(&["invoice processing"], "A", ""));
        s.index(2, &doc(&["invoice", "processing"], "B", ""));
        let full = s.query("invoice processing", 10);
        let part = s.query("invoice", 10);
        let score = |r: &[(DocId, f32)], d| r.iter().find(|x| x.0 == d).map(|x| x.1);
        // doc 1 gets one bonus for the full tag; doc 2 two bonuses
        assert!(score(&full, 2) > score(&full, 1), "{full:?}");
        // with one word only, doc 1 gets no bonus, doc 2 one
        let p1 = score(&part, 1).expect("1");
        let p2 = score(&part, 2).expect("2");
        assert!(p2 > p1 + TAG_MATCH_BONUS * 0.9, "{part:?}");
        let f1 = score(&full, 1).expect("1");
        assert!(f1 > p1 + TAG_MATCH_BONUS * 0.9, "{full:?} {part:?}");
    }

    #[test]
    fn tokenizer() {
        assert_eq!(
            tokenize("Please summarize THIS invoice_42, ok?"),
            vec!["summariz", "invoic", "42", "ok"]
        );
        assert!(tokenize("the a of").is_empty());
    }

    fn doc(tags: &[&str], name: &str, desc: &str) -> Document {
        let mut d = Document::default();
        for t in tags {
            d.push(FieldKind::Tag, *t);
        }
        d.push(FieldKind::SkillName, name);
        d.push(FieldKind::SkillDescription, desc);
        d
    }

    #[test]
    fn invoice_summarizer_wins() {
        let mut s = Bm25::default();
        s.index(
            1,
            &doc(&["weather", "forecast"], "Forecast", "Weather for a city"),
        );
        s.index(
            2,
            &doc(
                &["invoice", "summarization"],
                "Invoice digest",
                "Reads an invoice and produces a short summary",
            ),
        );
        s.index(
            3,
            &doc(&["translation"], "Translate", "Translate text to French"),
        );
        s.index(
            4,
            &doc(
                &["billing"],
                "Create invoices",
                "Creates invoices for customers",
            ),
        );
        let r = s.query("summarize this invoice", 10);
        assert_eq!(r[0].0, 2, "{r:?}");
        assert!(r.iter().all(|(d, _)| *d != 1 && *d != 3), "{r:?}");
        // 4 matches on "invoice" only, well below 2
        let four = r.iter().find(|(d, _)| *d == 4).map(|x| x.1);
        assert!(four.is_some_and(|f| f < r[0].1 * 0.6), "{r:?}");
        assert!(s.query("weather", 10).iter().all(|(d, _)| *d == 1));
        assert!(s.query("quantum chromodynamics", 10).is_empty());
    }

    #[test]
    fn tags_weigh_more_and_exact_tags_get_a_bonus() {
        let mut s = Bm25::default();
        s.index(1, &doc(&["ocr"], "Reader", "Reads text"));
        s.index(2, &doc(&[], "Reader", "Also does ocr"));
        let r = s.query("ocr", 10);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(r[0].1 >= r[1].1 + TAG_MATCH_BONUS);
    }

    #[test]
    fn remove_and_reindex() {
        let mut s = Bm25::default();
        s.index(1, &doc(&["ocr"], "Reader", ""));
        s.index(2, &doc(&["ocr"], "Reader", ""));
        assert_eq!(s.len(), 2);
        s.remove(1);
        assert_eq!(
            s.query("ocr", 10).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2]
        );
        s.index(2, &doc(&["weather"], "Forecast", ""));
        assert!(s.query("ocr", 10).is_empty());
        assert_eq!(s.query("weather", 10).len(), 1);
        s.remove(2);
        assert!(s.is_empty());
        assert!(s.term_ids.is_empty());
        assert!(s.postings.iter().all(Vec::is_empty));
        // term numbers are recycled
        s.index(3, &doc(&["ocr"], "Reader", ""));
        assert_eq!(s.postings.len(), 2, "{:?}", s.term_ids);
    }

    #[test]
    fn limit_and_ties_are_deterministic() {
        let mut s = Bm25::default();
        for i in (0..20).rev() {
            s.index(i, &doc(&["ocr"], "Reader", ""));
        }
        let r = s.query("ocr", 5);
        assert_eq!(
            r.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
    }
}
