//! Semantic intent scores and their fusion with BM25.
//!
//! Owns: what text of a card is embedded ([`card_texts`]), the int8 vectors
//! kept per agent ([`Q8`], [`CardVectors`]), the semantic score of an agent
//! for a query (best match over its pieces), and the fusion of that score
//! with the lexical one ([`Fusion`]).
//!
//! Why it is shaped so: the registry stays pure and model-free. The node
//! runs the model (crate `dmsc-embed`) outside any lock, on a blocking
//! pool: card pieces once per card digest, the query once per request; it
//! hands the registry quantized vectors. Selection by name or tag never
//! touches any of this.
//!
//! - Pieces. A card is embedded as several short texts rather than one long
//!   one: per skill, its name, description and tags; each of its examples;
//!   the card's name and description. A request usually resembles one of
//!   them (an example most of all), and a long concatenation blurs them.
//!   An agent's semantic score mixes its best piece's cosine, a little of
//!   its second best ([`SECOND_WEIGHT`]: agents whose skills agree with the
//!   request in several places win ties against a single lucky example) and
//!   the cosine with the card's centroid (the mean of its pieces, a
//!   prototype of everything the agent does), divided so that it stays on
//!   the cosine scale. On the project's development sets the centroid term
//!   moved top-1 from 74 % to 77 % (`dmsc-bench intent`, BENCHMARKS.md).
//! - int8. Each vector is stored as 384 `i8` plus one `f32` scale (392
//!   bytes instead of 1536); cosine error from quantization is below 0.01,
//!   far below the score gaps that decide a ranking.
//! - Fusion. BM25 scores are unbounded and depend on the corpus; cosines of
//!   a sentence model live in a narrow band (about 0.1 unrelated to 0.7
//!   close). Both are mapped to 0..1 for the query at hand: BM25 relative
//!   to the best BM25 score, cosine relative to the best cosine above a
//!   floor. The fused score is their weighted sum, `semantic_weight` on the
//!   semantic side ([`Fusion::default`]). A query with no lexical hit is
//!   ranked on meaning alone, if the model's best reaches
//!   [`Fusion::meaning_alone`] (below it: no match), and one the model
//!   cannot place (empty text, nothing above the floor) on words alone.

use std::collections::HashMap;

use crate::card::AgentCard;
use crate::fx::FxBuild;

/// Weight of an agent's second-best piece in its semantic score.
pub const SECOND_WEIGHT: f32 = 0.15;

/// A vector quantized to `i8` with one scale: `v[i] ~= q[i] * scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8 {
    scale: f32,
    q: Box<[i8]>,
}

impl Q8 {
    /// Quantizes `v` (any length; a zero vector stays zero).
    pub fn from_f32(v: &[f32]) -> Q8 {
        let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = if max.is_finite() && max > 0.0 {
            max / 127.0
        } else {
            0.0
        };
        let q = v
            .iter()
            .map(|x| {
                if scale == 0.0 {
                    0
                } else {
                    (x / scale).round().clamp(-127.0, 127.0) as i8
                }
            })
            .collect();
        Q8 { scale, q }
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Dot product (the cosine, for unit vectors). Vectors of different
    /// lengths (two models) score 0.
    pub fn dot(&self, other: &Q8) -> f32 {
        if self.q.len() != other.q.len() {
            return 0.0;
        }
        // i8 x i8 summed in i32: vectorizes, and cannot overflow below
        // 133k dimensions.
        let sum: i32 = self
            .q
            .iter()
            .zip(other.q.iter())
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        sum as f32 * self.scale * other.scale
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len()
    }
}

/// Which part of a card a piece of text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Piece {
    /// A skill's name, description and tags (index into `skills`).
    Skill(u16),
    /// One example of a skill.
    Example(u16),
    /// The card's name and description.
    Card,
    /// An example learned from callers' choices.
    Learned,
}

/// The texts of a card that are embedded, in a stable order.
pub fn card_texts(card: &AgentCard) -> Vec<(Piece, String)> {
    let mut out = Vec::new();
    let mut card_text = humanize(&card.name);
    if let Some(d) = card.description.as_deref().filter(|d| !d.trim().is_empty()) {
        card_text.push_str(": ");
        card_text.push_str(d);
    }
    out.push((Piece::Card, card_text));
    for (i, s) in card.skills.iter().enumerate() {
        let Ok(i) = u16::try_from(i) else { break };
        let mut text = s.name.clone();
        if let Some(d) = s.description.as_deref().filter(|d| !d.trim().is_empty()) {
            text.push_str(": ");
            text.push_str(d);
        }
        let tags = s.tags.as_deref().unwrap_or_default();
        if !tags.is_empty() {
            text.push_str(" (");
            text.push_str(&tags.join(", "));
            text.push(')');
        }
        out.push((Piece::Skill(i), text));
        for ex in s.examples.iter().flatten() {
            if !ex.trim().is_empty() {
                out.push((Piece::Example(i), ex.clone()));
            }
        }
    }
    out
}

/// `invoice-digest` -> `invoice digest`: names are slugs, the model reads words.
fn humanize(name: &str) -> String {
    name.replace(['-', '_', '.'], " ")
}

/// Weight of the cosine with the card's centroid in an agent's semantic score.
pub const CENTROID_WEIGHT: f32 = 1.0;

/// The embedded pieces of one card (shared by every agent with that card
/// digest: replicas cost one set of vectors).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CardVectors {
    pub pieces: Vec<(Piece, Q8)>,
    /// Unit mean of the pieces.
    pub centroid: Option<Q8>,
}

impl CardVectors {
    /// Quantizes the pieces' unit vectors and computes their centroid.
    pub fn new(pieces: Vec<(Piece, Vec<f32>)>) -> CardVectors {
        let dim = pieces.first().map_or(0, |(_, v)| v.len());
        let mut mean = vec![0.0f32; dim];
        for (_, v) in pieces.iter().filter(|(_, v)| v.len() == dim) {
            mean.iter_mut().zip(v).for_each(|(m, x)| *m += x);
        }
        let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
        let centroid = (norm.is_finite() && norm > 0.0).then(|| {
            mean.iter_mut().for_each(|x| *x /= norm);
            Q8::from_f32(&mean)
        });
        CardVectors {
            pieces: pieces
                .into_iter()
                .map(|(p, v)| (p, Q8::from_f32(&v)))
                .collect(),
            centroid,
        }
    }

    /// Heap bytes held (for the RSS budget).
    pub fn bytes(&self) -> usize {
        self.pieces
            .iter()
            .map(|(_, v)| v.bytes() + 24)
            .sum::<usize>()
            + self.centroid.as_ref().map_or(0, Q8::bytes)
    }
}

/// The semantic score of an agent (see the module docs): best piece,
/// [`SECOND_WEIGHT`] of the second best (over its card's pieces and
/// `extra`, its learned examples) and [`CENTROID_WEIGHT`] of the centroid's
/// cosine, on the cosine scale.
pub(crate) fn agent_score<'a>(
    query: &Q8,
    card: &'a CardVectors,
    extra: impl Iterator<Item = &'a Q8>,
) -> Option<f32> {
    let best = best_two(query, card.pieces.iter().map(|(_, v)| v).chain(extra))?;
    Some(match &card.centroid {
        Some(c) => {
            (best + CENTROID_WEIGHT * query.dot(c)) / (1.0 + SECOND_WEIGHT + CENTROID_WEIGHT)
        }
        None => best / (1.0 + SECOND_WEIGHT),
    })
}

/// Best piece plus [`SECOND_WEIGHT`] of the second best (the best again
/// when there is one piece).
fn best_two<'a>(query: &Q8, pieces: impl Iterator<Item = &'a Q8>) -> Option<f32> {
    let (mut best, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for v in pieces {
        let s = query.dot(v);
        if s > best {
            second = best;
            best = s;
        } else if s > second {
            second = s;
        }
    }
    if best == f32::NEG_INFINITY {
        return None;
    }
    let second = if second == f32::NEG_INFINITY {
        best
    } else {
        second
    };
    Some(best + SECOND_WEIGHT * second)
}

/// How lexical and semantic scores are fused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fusion {
    /// Share of the semantic side, 0..=1 (0: BM25 only; 1: the model only).
    pub semantic_weight: f32,
    /// Semantic scores at or below this count as no match.
    pub floor: f32,
    /// A query with no word in common with any agent is matched on meaning
    /// alone only when the best semantic score reaches this: below it the
    /// model's best is noise (gibberish, a language it was not trained on),
    /// and "no match" is the honest answer.
    pub meaning_alone: f32,
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion {
            semantic_weight: 0.8,
            floor: 0.15,
            meaning_alone: MEANING_ALONE,
        }
    }
}

/// [`Fusion::meaning_alone`]'s default. Measured with all-MiniLM-L6-v2 on
/// the demo's agents (agent scores, on the cosine scale above): random
/// letters ("qzxv plorbt", "asdf") and a script it was not trained on at
/// 0.15-0.18, "hello" and "lorem ipsum dolor" at 0.20-0.21, requests that
/// share no word with the right card at 0.22-0.30 ("I was charged twice"
/// to billing 0.22, "say it in Spanish" to the translator 0.30), and on the
/// node tests' agents 0.23-0.35. Every query of the development sets
/// shares a word with some card, so this changes none of their routes. A
/// guard against the clearest noise, not a confidence: ask mode
/// ([`AskRule::min_semantic`]) is that.
pub const MEANING_ALONE: f32 = 0.2;

/// One agent's scores for a query.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores {
    pub slot: u32,
    /// Fused, 0..=1.
    pub fused: f32,
    /// Raw BM25 (0: no lexical hit).
    pub lexical: f32,
    /// Raw semantic score (`None`: the agent has no vectors yet).
    pub semantic: Option<f32>,
}

/// Fuses a BM25 ranking with semantic scores, best first (ties by slot).
/// `semantic` holds every agent of the tenant that has vectors.
pub(crate) fn fuse(fusion: Fusion, lexical: &[(u32, f32)], semantic: &[(u32, f32)]) -> Vec<Scores> {
    let mut all: HashMap<u32, Scores, FxBuild> =
        HashMap::with_capacity_and_hasher(lexical.len() + semantic.len(), FxBuild::default());
    for &(slot, l) in lexical {
        all.entry(slot).or_insert(Scores {
            slot,
            ..Scores::default()
        });
        if let Some(e) = all.get_mut(&slot) {
            e.lexical = l;
        }
    }
    for &(slot, s) in semantic {
        let e = all.entry(slot).or_insert(Scores {
            slot,
            ..Scores::default()
        });
        e.semantic = Some(s);
    }
    let lex_best = lexical.iter().map(|x| x.1).fold(0.0f32, f32::max);
    let sem_best = semantic
        .iter()
        .map(|x| x.1)
        .fold(f32::NEG_INFINITY, f32::max);
    let sem_on = if semantic.is_empty() {
        false
    } else {
        sem_best > fusion.floor && (lex_best > 0.0 || sem_best >= fusion.meaning_alone)
    };
    let w = if !sem_on {
        0.0
    } else if lex_best <= 0.0 {
        1.0
    } else {
        fusion.semantic_weight.clamp(0.0, 1.0)
    };
    // An agent without vectors (card not fetched or not embedded yet) is
    // given the median semantic score of the others: neither sunk by the
    // missing term nor lifted over agents the model does place.
    let median_m = {
        let mut ms: Vec<f32> = semantic
            .iter()
            .map(|&(_, v)| {
                if sem_on && v > fusion.floor {
                    (v - fusion.floor) / (sem_best - fusion.floor)
                } else {
                    0.0
                }
            })
            .collect();
        ms.sort_unstable_by(f32::total_cmp);
        ms.get(ms.len() / 2).copied().unwrap_or(0.0)
    };
    let mut out: Vec<Scores> = all
        .into_values()
        .map(|mut s| {
            let l = if lex_best > 0.0 {
                s.lexical / lex_best
            } else {
                0.0
            };
            let m = match s.semantic {
                Some(v) if sem_on && v > fusion.floor => {
                    (v - fusion.floor) / (sem_best - fusion.floor)
                }
                _ => 0.0,
            };
            let m = if sem_on && s.semantic.is_none() {
                median_m
            } else {
                m
            };
            s.fused = (1.0 - w) * l + w * m;
            s
        })
        .filter(|s| s.fused > 0.0)
        .collect();
    out.sort_unstable_by(|a, b| b.fused.total_cmp(&a.fused).then(a.slot.cmp(&b.slot)));
    out
}

/// Whether to route an intent to its best match or ask the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Confident enough: route to the best match.
    Route,
    /// Unsure: offer the first this-many candidates.
    Ask(usize),
}

/// When an intent is too uncertain to route (ask mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AskRule {
    /// Ask when the runner-up's fused score is within this of the best's
    /// (fused scores are 0..=1, the best usually 1).
    pub margin: f32,
    /// Ask when the best agent's semantic score is below this (the model
    /// sees no close match, whatever the words say).
    pub min_semantic: f32,
    /// Candidates offered at most.
    pub max_candidates: usize,
}

impl Default for AskRule {
    fn default() -> Self {
        // On the development sets: 97.7 % of the routes taken are right,
        // 61 % of requests asked (BENCHMARKS.md, "Issue 13").
        AskRule {
            margin: 0.3,
            min_semantic: 0.45,
            max_candidates: 5,
        }
    }
}

impl Ask {
    /// [`AskRule::decide`] with the default rule.
    pub fn decide(ranked: &[Scores]) -> Ask {
        AskRule::default().decide(ranked)
    }
}

impl AskRule {
    /// Route or ask, from a ranking (best first). Nothing ranked: route
    /// (selection reports "no match"). Candidates offered: those within
    /// twice the margin of the best, at least two, at most `max_candidates`.
    pub fn decide(&self, ranked: &[Scores]) -> Ask {
        let Some(best) = ranked.first() else {
            return Ask::Route;
        };
        let close = ranked
            .get(1)
            .is_some_and(|r| best.fused - r.fused < self.margin);
        // With the model on, a best match it could not place (no vectors
        // yet) is as unsure as a weak one.
        let model_on = ranked.iter().any(|r| r.semantic.is_some());
        let weak = match best.semantic {
            Some(s) => s < self.min_semantic,
            None => model_on,
        };
        if !close && !weak {
            return Ask::Route;
        }
        let n = ranked
            .iter()
            .take(self.max_candidates.max(1))
            .take_while(|r| best.fused - r.fused < 2.0 * self.margin)
            .count()
            .max(2)
            .min(ranked.len())
            .min(self.max_candidates.max(1));
        if n <= 1 && !weak {
            Ask::Route
        } else {
            Ask::Ask(n.max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn quantized_dot_is_close_to_the_float_one() {
        let a = unit(
            &(0..384)
                .map(|i| ((i * 7919) % 113) as f32 - 56.0)
                .collect::<Vec<_>>(),
        );
        let b = unit(
            &(0..384)
                .map(|i| ((i * 104729) % 97) as f32 - 40.0)
                .collect::<Vec<_>>(),
        );
        let exact: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let q = Q8::from_f32(&a).dot(&Q8::from_f32(&b));
        assert!((exact - q).abs() < 0.01, "{exact} vs {q}");
        assert!((Q8::from_f32(&a).dot(&Q8::from_f32(&a)) - 1.0).abs() < 0.01);
        assert_eq!(Q8::from_f32(&[0.0; 4]).dot(&Q8::from_f32(&[1.0; 4])), 0.0);
        assert_eq!(Q8::from_f32(&[1.0; 4]).dot(&Q8::from_f32(&[1.0; 3])), 0.0);
    }

    #[test]
    fn fusion_combines_and_falls_back() {
        let f = Fusion {
            semantic_weight: 0.5,
            floor: 0.1,
            meaning_alone: 0.3,
        };
        // slot 1: lexical best, semantically weak; slot 2: the reverse;
        // slot 3: good on both sides.
        let lex = [(1, 10.0), (3, 8.0), (2, 1.0)];
        let sem = [(1, 0.2), (2, 0.6), (3, 0.55)];
        let r = fuse(f, &lex, &sem);
        assert_eq!(r[0].slot, 3, "{r:?}");
        assert!(r[0].fused <= 1.0 && r.iter().all(|s| s.fused > 0.0));
        // weight 0: lexical order; weight 1: semantic order
        let by = |w: f32| {
            fuse(
                Fusion {
                    semantic_weight: w,
                    ..f
                },
                &lex,
                &sem,
            )
            .iter()
            .map(|s| s.slot)
            .collect::<Vec<_>>()
        };
        assert_eq!(by(0.0)[0], 1);
        assert_eq!(by(1.0)[0], 2);
        // no lexical hit: meaning alone
        let r = fuse(f, &[], &sem);
        assert_eq!(r[0].slot, 2);
        assert!((r[0].fused - 1.0).abs() < 1e-6);
        // no lexical hit and a weak meaning: no match (noise), not a
        // confident route to whichever agent the noise was nearest
        assert!(fuse(f, &[], &[(1, 0.29), (2, 0.2)]).is_empty());
        // ... while with a word in common, the weak meaning still counts
        assert_eq!(fuse(f, &[(2, 1.0)], &[(1, 0.29), (2, 0.2)])[0].slot, 2);
        // the model places nothing above the floor: words alone
        let r = fuse(f, &lex, &[(1, 0.05), (2, 0.02)]);
        assert_eq!(r.iter().map(|s| s.slot).collect::<Vec<_>>(), vec![1, 3, 2]);
        // nothing at all
        assert!(fuse(f, &[], &[(1, 0.01)]).is_empty());
        // an agent with no vectors counts as the median of the others on
        // the semantic side: reachable by its words, not above a clear
        // semantic winner
        let sem3 = [(2, 0.6), (3, 0.3), (4, 0.2)];
        let r = fuse(f, &[(9, 10.0), (2, 1.0)], &sem3);
        let nine = r.iter().find(|s| s.slot == 9).expect("9 ranked");
        assert!(nine.fused > 0.5, "{r:?}");
        // (at the default weight, where the model's view dominates)
        let r = fuse(Fusion::default(), &[(9, 1.0)], &sem3);
        assert_eq!(r[0].slot, 2, "{r:?}");
    }

    #[test]
    fn best_piece_plus_a_little_of_the_second_plus_the_centroid() {
        let q = Q8::from_f32(&[1.0, 0.0]);
        let a = [Q8::from_f32(&[0.8, 0.6]), Q8::from_f32(&[0.6, 0.8])];
        let s = best_two(&q, a.iter()).expect("score");
        assert!((s - (0.8 + SECOND_WEIGHT * 0.6)).abs() < 0.02, "{s}");
        assert_eq!(best_two(&q, [].iter()), None);
        let one = [Q8::from_f32(&[1.0, 0.0])];
        let s = best_two(&q, one.iter()).expect("one");
        assert!((s - (1.0 + SECOND_WEIGHT)).abs() < 0.02, "{s}");
        let card = CardVectors::new(vec![
            (Piece::Card, vec![0.8, 0.6]),
            (Piece::Skill(0), vec![0.6, 0.8]),
        ]);
        let c = 1.4 / (2.0f32 * 1.4 * 1.4).sqrt(); // centroid (1,1)/sqrt2
        let want = (0.8 + SECOND_WEIGHT * 0.6 + CENTROID_WEIGHT * c)
            / (1.0 + SECOND_WEIGHT + CENTROID_WEIGHT);
        let s = agent_score(&q, &card, [].iter()).expect("agent");
        assert!((s - want).abs() < 0.02, "{s} vs {want}");
        // a learned example counts like a piece
        let learned = [Q8::from_f32(&[1.0, 0.0])];
        assert!(agent_score(&q, &card, learned.iter()).expect("learned") > s);
        assert_eq!(agent_score(&q, &CardVectors::default(), [].iter()), None);
    }

    #[test]
    fn card_texts_cover_skills_examples_and_the_card() {
        let card: AgentCard = serde_json::from_value(serde_json::json!({
            "name": "invoice-digest", "description": "Summaries of invoices.",
            "skills": [{"id": "s", "name": "Summarize", "description": "Reads an invoice",
                        "tags": ["invoice", "summary"], "examples": ["sum up this bill", " "]}]
        }))
        .expect("card");
        let t = card_texts(&card);
        assert_eq!(
            t,
            vec![
                (
                    Piece::Card,
                    "invoice digest: Summaries of invoices.".to_string()
                ),
                (
                    Piece::Skill(0),
                    "Summarize: Reads an invoice (invoice, summary)".to_string()
                ),
                (Piece::Example(0), "sum up this bill".to_string()),
            ]
        );
    }
}
