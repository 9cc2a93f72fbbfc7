//! Property tests: selection invariants over random registries, lossless
//! card import/export in both dialects, and URL rewriting that hides the agent.

use std::collections::HashSet;

use dmsc_registry::card::is_slug;
use dmsc_registry::{
    slug, AgentCard, AgentId, AgentRecord, Choice, Health, LoadReport, LocalState, Registry,
    SelectError, SkillTags, Target,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------- selection

const TENANTS: &[&str] = &["acme", "globex", "initech"];
const TAGS: &[&str] = &[
    "billing",
    "ocr",
    "invoice",
    "weather",
    "translation",
    "common",
];

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        tenant: usize,
        name: usize,
        node: usize,
        tags: Vec<usize>,
        health: Health,
        expires: u64,
    },
    Load {
        tenant: usize,
        name: usize,
        in_flight: u32,
        ewma: f32,
        err: f32,
    },
    Remove {
        tenant: usize,
        name: usize,
    },
    RemoveNode(usize),
    Expire(u64),
}

fn health() -> impl Strategy<Value = Health> {
    prop_oneof![
        3 => Just(Health::Healthy),
        1 => Just(Health::Unhealthy),
        1 => Just(Health::Unknown),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..3usize, 0..60usize, 0..4usize, prop::collection::vec(0..TAGS.len(), 0..4), health(), 0..100u64)
            .prop_map(|(tenant, name, node, tags, health, expires)| Op::Upsert { tenant, name, node, tags, health, expires }),
        4 => (0..3usize, 0..60usize, 0..50u32, 0.0..100f32, 0.0..1f32)
            .prop_map(|(tenant, name, in_flight, ewma, err)| Op::Load { tenant, name, in_flight, ewma, err }),
        1 => (0..3usize, 0..60usize).prop_map(|(tenant, name)| Op::Remove { tenant, name }),
        1 => (0..4usize).prop_map(Op::RemoveNode),
        1 => (0..30u64).prop_map(Op::Expire),
    ]
}

fn name(i: usize) -> String {
    format!("agent-{i}")
}

fn apply(r: &mut Registry, op: &Op) {
    match op {
        Op::Upsert {
            tenant,
            name: n,
            node,
            tags,
            health,
            expires,
        } => {
            // every agent also carries `common`, so large tag sets (sampling path) occur
            let mut t: Vec<String> = tags.iter().map(|&i| TAGS[i].to_string()).collect();
            t.push("Common".into());
            let rec = AgentRecord {
                digest: format!("d{expires}"),
                skills: vec![SkillTags {
                    id: "skill".into(),
                    name: format!("skill {}", t.join(" ")),
                    tags: t,
                }],
                protocols: vec!["JSONRPC".into()],
                a2a: Vec::new(),
                health: *health,
                expires_ms: *expires,
            };
            r.upsert(
                &format!("node-{node}"),
                AgentId::new(TENANTS[*tenant], name(*n)),
                rec,
            );
        }
        Op::Load {
            tenant,
            name: n,
            in_flight,
            ewma,
            err,
        } => r.set_load(
            &AgentId::new(TENANTS[*tenant], name(*n)),
            LoadReport {
                in_flight: *in_flight,
                queue: 0,
                ewma_ms: *ewma,
                error_rate: *err,
                cpu: 0.0,
            },
        ),
        Op::Remove { tenant, name: n } => {
            r.remove(&AgentId::new(TENANTS[*tenant], name(*n)));
        }
        Op::RemoveNode(n) => {
            r.remove_node(&format!("node-{n}"));
        }
        Op::Expire(t) => {
            r.expire(*t);
        }
    }
}

struct Local {
    open: HashSet<AgentId>,
}

impl LocalState for Local {
    fn outstanding(&self, id: &AgentId) -> u32 {
        (id.name.len() % 3) as u32
    }
    fn admits(&self, id: &AgentId, _: &str) -> bool {
        !self.open.contains(id)
    }
}

#[derive(Debug, Clone)]
enum T {
    Agent(usize),
    Tag(usize, bool),
    Intent(Vec<usize>),
}

fn target() -> impl Strategy<Value = T> {
    prop_oneof![
        (0..60usize).prop_map(T::Agent),
        (0..TAGS.len(), any::<bool>()).prop_map(|(t, up)| T::Tag(t, up)),
        prop::collection::vec(0..TAGS.len(), 1..3).prop_map(T::Intent),
    ]
}

fn has_tag(r: &Registry, id: &AgentId, tag: &str) -> bool {
    r.get(id)
        .is_some_and(|e| e.record.tags().any(|t| t.eq_ignore_ascii_case(tag)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn selection_never_returns_an_ineligible_or_foreign_agent(
        ops in prop::collection::vec(op(), 1..250),
        tenant in 0..3usize,
        targets in prop::collection::vec(target(), 1..8),
        open in prop::collection::hash_set(0..60usize, 0..30),
        excluded in prop::collection::vec(0..60usize, 0..20),
        seed in any::<u64>(),
        least in any::<bool>(),
    ) {
        let mut r = Registry::new();
        if least {
            r.set_choice(Choice::LeastLoaded);
        }
        for o in &ops {
            apply(&mut r, o);
        }
        let tenant = TENANTS[tenant];
        let local = Local {
            // circuits are per agent id, including same-named agents of other tenants
            open: open.iter().flat_map(|&i| TENANTS.iter().map(move |t| AgentId::new(*t, name(i)))).collect(),
        };
        let exclude: Vec<AgentId> = excluded.iter().map(|&i| AgentId::new(tenant, name(i))).collect();
        let eligible = |id: &AgentId| {
            r.get(id).is_some_and(|e| e.record.health() == Health::Healthy)
                && local.admits(id, "")
                && !exclude.contains(id)
        };
        let mut rng = StdRng::seed_from_u64(seed);
        for t in &targets {
            let target = match t {
                T::Agent(i) => Target::Agent(name(*i)),
                T::Tag(i, up) => Target::Tag(if *up { TAGS[*i].to_uppercase() } else { TAGS[*i].to_string() }),
                T::Intent(words) => Target::Intent(words.iter().map(|&i| TAGS[i]).collect::<Vec<_>>().join(" please ")),
            };
            let res = r.select(tenant, &target, &local, &exclude, &mut rng);
            // what a brute-force scan says could have been chosen
            let any_eligible = |pred: &dyn Fn(&AgentId) -> bool| {
                r.iter().any(|e| e.id.tenant == tenant && pred(&e.id) && eligible(&e.id))
            };
            match (&res, &target) {
                (Ok(s), _) => {
                    prop_assert_eq!(&s.id.tenant, tenant, "foreign agent {}", s.id);
                    let e = r.get(&s.id).expect("selected agent exists");
                    prop_assert_eq!(e.record.health(), Health::Healthy);
                    prop_assert!(local.admits(&s.id, &s.node), "circuit-open agent {}", s.id);
                    prop_assert!(!exclude.contains(&s.id), "excluded agent {}", s.id);
                    prop_assert_eq!(s.node.as_str(), &*e.node);
                    if let Some((o, _)) = &s.other {
                        prop_assert!(o != &s.id);
                        prop_assert!(eligible(o) && o.tenant == tenant);
                        prop_assert!(s.score <= s.other.as_ref().map_or(f64::MAX, |x| x.1));
                    }
                    match &target {
                        Target::Agent(n) => prop_assert_eq!(&s.id.name, n),
                        Target::Tag(tag) => prop_assert!(has_tag(&r, &s.id, tag)),
                        Target::Intent(_) => {}
                    }
                }
                (Err(SelectError::NoneEligible { .. } | SelectError::NoMatch { .. } | SelectError::UnknownAgent { .. }), Target::Tag(tag)) => {
                    // completeness: nothing eligible with that tag
                    prop_assert!(!any_eligible(&|id| has_tag(&r, id, tag)), "{:?} but an eligible agent exists", res);
                }
                (Err(e @ SelectError::NoBinding { .. }), Target::Tag(_)) => {
                    // only an intent is filtered by binding
                    prop_assert!(false, "a binding refusal for a tag: {:?}", e);
                }
                (Err(_), Target::Agent(n)) => {
                    prop_assert!(!eligible(&AgentId::new(tenant, n.clone())), "{:?}", res);
                }
                (Err(_), Target::Intent(_)) => {}
            }
        }
        // index consistency: every entry of the tenant with a tag is findable by name
        for e in r.iter() {
            let found = r.select(&e.id.tenant, &Target::Agent(e.id.name.clone()), &dmsc_registry::NoLocal, &[], &mut rng);
            let healthy = e.record.health() == Health::Healthy;
            prop_assert_eq!(found.is_ok(), healthy, "{}: {:?}", e.id, found);
        }
    }

    #[test]
    fn slugs_are_dns_labels(s in ".{0,100}") {
        let out = slug(&s);
        prop_assert!(is_slug(&out), "{:?} -> {:?}", s, out);
        prop_assert_eq!(slug(&out), out.clone());
    }
}

// -------------------------------------------------------------------- cards

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z][a-zA-Z0-9 _-]{0,20}", ".{0,30}",]
}

fn nonempty() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9 _.-]{0,20}"
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1000i32..1000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        text().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z][a-zA-Z0-9]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Unknown fields: keys start with `x`, which no typed field does.
fn extras() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("x[A-Za-z0-9_]{0,10}", json_value(), 0..3)
        .prop_map(|m| m.into_iter().collect())
}

/// An optional string field: absent, null, or a string.
fn opt_str() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Value::Null)),
        3 => text().prop_map(|s| Some(Value::String(s))),
    ]
}

fn opt_str_list() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(Value::Null)),
        3 => prop::collection::vec(text(), 0..4).prop_map(|v| Some(json!(v))),
    ]
}

fn put(m: &mut Map<String, Value>, k: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(k.to_string(), v);
    }
}

fn skill() -> impl Strategy<Value = Value> {
    (
        nonempty(),
        nonempty(),
        opt_str(),
        opt_str_list(),
        opt_str_list(),
        opt_str_list(),
        opt_str_list(),
        extras(),
    )
        .prop_map(|(id, name, desc, tags, ex, inm, outm, extra)| {
            let mut m = extra;
            m.insert("id".into(), json!(id));
            m.insert("name".into(), json!(name));
            put(&mut m, "description", desc);
            put(&mut m, "tags", tags);
            put(&mut m, "examples", ex);
            put(&mut m, "inputModes", inm);
            put(&mut m, "outputModes", outm);
            Value::Object(m)
        })
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u8..255, 0u8..255, 1u8..255, 1000u16..65000)
            .prop_map(|(a, b, c, p)| format!("10.{a}.{b}.{c}:{p}")),
        "agent-[a-z]{3,8}\\.internal(:[1-9][0-9]{3})?",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/".to_string()),
        "(/[a-z0-9]{1,6}){1,3}(\\?q=[a-z]{1,4})?",
    ]
}

fn endpoint(host: String) -> impl Strategy<Value = String> {
    (prop_oneof![Just("http"), Just("https")], path())
        .prop_map(move |(scheme, path)| format!("{scheme}://{host}{path}"))
}

fn interface(host: String, v10: bool) -> impl Strategy<Value = Value> {
    (
        endpoint(host),
        prop_oneof![Just("JSONRPC"), Just("GRPC"), Just("HTTP+JSON")],
        extras(),
    )
        .prop_map(move |(url, binding, extra)| {
            let mut m = extra;
            m.insert("url".into(), json!(url));
            if v10 {
                m.insert("protocolBinding".into(), json!(binding));
                m.insert("protocolVersion".into(), json!("1.0"));
            } else {
                m.insert("transport".into(), json!(binding));
            }
            Value::Object(m)
        })
}

/// A random valid card in either dialect; every endpoint URL is at `host`,
/// and so are a `documentationUrl` and an OAuth token URL.
fn card_at(host: String) -> impl Strategy<Value = (Value, bool)> {
    let v10 = any::<bool>();
    v10.prop_flat_map(move |v10| {
        let h = host.clone();
        (
            nonempty(),
            opt_str(),
            opt_str(),
            prop::collection::vec(skill(), 0..5),
            endpoint(h.clone()),
            prop::collection::vec(interface(h.clone(), v10), if v10 { 1..4 } else { 0..3 }),
            opt_str_list(),
            prop::option::of(json_value()),
            prop::option::of(any::<bool>()),
            extras(),
            endpoint(h),
        )
            .prop_map(
                move |(name, desc, version, skills, url, ifaces, modes, cap_extra, streaming, extra, doc_url)| {
                    let mut m = extra;
                    m.insert("name".into(), json!(name));
                    put(&mut m, "description", desc);
                    put(&mut m, "version", version);
                    m.insert("skills".into(), Value::Array(skills));
                    put(&mut m, "defaultInputModes", modes);
                    m.insert("documentationUrl".into(), json!(doc_url));
                    m.insert(
                        "securitySchemes".into(),
                        json!({"oauth": {"type": "oauth2", "flows": {"clientCredentials": {
                            "tokenUrl": format!("{}/token", url.trim_end_matches('/')), "scopes": {"read": "r"}}}},
                            "key": {"type": "apiKey", "in": "header", "name": "X-Key"}}),
                    );
                    m.insert("security".into(), json!([{"oauth": ["read"]}, {"key": []}]));
                    m.insert(
                        "provider".into(),
                        json!({"organization": "Acme", "url": "https://provider.example/about"}),
                    );
                    if let Some(s) = streaming {
                        m.insert("capabilities".into(), json!({"streaming": s, "x": cap_extra}));
                    }
                    if v10 {
                        m.insert("supportedInterfaces".into(), Value::Array(ifaces));
                    } else {
                        m.insert("url".into(), json!(url));
                        m.insert("preferredTransport".into(), json!("JSONRPC"));
                        m.insert("protocolVersion".into(), json!("0.3.0"));
                        if !ifaces.is_empty() {
                            m.insert("additionalInterfaces".into(), Value::Array(ifaces));
                        }
                    }
                    (Value::Object(m), v10)
                },
            )
    })
}

fn card() -> impl Strategy<Value = (Value, bool, String)> {
    host().prop_flat_map(|h| card_at(h.clone()).prop_map(move |(v, v10)| (v, v10, h.clone())))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cards_round_trip_losslessly((value, v10, _host) in card()) {
        let bytes = serde_json::to_vec(&value).expect("json");
        let card = AgentCard::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&card.to_json(), &value);
        prop_assert_eq!(card.dialect() == dmsc_registry::Dialect::V10, v10);
        let again = AgentCard::parse(&card.to_bytes()).expect("own output parses");
        prop_assert_eq!(&again, &card);
        prop_assert_eq!(again.digest(), card.digest());
        // pretty-printed input: same digest
        let pretty = serde_json::to_string_pretty(&value).expect("json");
        prop_assert_eq!(AgentCard::parse(pretty.as_bytes()).expect("valid").digest(), card.digest());
    }

    #[test]
    fn rewritten_cards_never_reveal_the_agent((value, _v10, host) in card()) {
        let mut card = AgentCard::from_value(value).expect("valid");
        let mesh = "http://billing.acme.dmsc";
        card.rewrite_urls(mesh);
        let text = String::from_utf8(card.to_bytes()).expect("utf8");
        prop_assert!(!text.contains(&host), "{} still in {}", host, text);
        for u in card.endpoint_urls() {
            prop_assert!(u.starts_with(mesh), "{}", u);
        }
        prop_assert!(text.contains("https://provider.example/about"), "unrelated URL was rewritten");
        let again = AgentCard::parse(&card.to_bytes()).expect("rewritten card is valid");
        prop_assert_eq!(again, card);
    }

    #[test]
    fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = AgentCard::parse(&bytes);
    }

    #[test]
    fn mutilated_cards_are_refused_with_a_path((value, _v10, _host) in card(), which in 0..4usize) {
        let mut v = value;
        let field = match which {
            0 => { v.as_object_mut().expect("object").remove("name"); "name" }
            1 => { v["skills"] = json!([{"id": "", "name": "x"}]); "skills[0].id" }
            2 => { v["skills"] = json!([{"id": "a", "name": "x", "tags": [1]}]); "skills[0].tags[0]" }
            _ => { v["defaultOutputModes"] = json!("text"); "defaultOutputModes" }
        };
        let err = AgentCard::from_value(v).expect_err("invalid");
        prop_assert!(err.problems().iter().any(|p| p.field == field), "{}", err);
        let msg = err.to_string();
        prop_assert!(msg.contains(&format!("`{field}`")), "{}", msg);
    }
}

// ------------------------------------------------------------ intent index

proptest! {
    /// An index after any sequence of adds, replacements and removals
    /// answers exactly like one built from scratch with the surviving documents.
    #[test]
    fn bm25_incremental_equals_rebuilt(
        ops in prop::collection::vec((0..20u32, prop::option::of(prop::collection::vec(0..TAGS.len(), 0..4))), 1..80),
        queries in prop::collection::vec(prop::collection::vec(0..TAGS.len(), 1..3), 1..5),
    ) {
        use dmsc_registry::{Bm25, Document, FieldKind, Scorer};
        use std::collections::BTreeMap;
        let doc = |tags: &[usize]| {
            let mut d = Document::default();
            for &t in tags {
                d.push(FieldKind::Tag, TAGS[t]);
                d.push(FieldKind::SkillDescription, format!("does {} work", TAGS[t]));
            }
            d
        };
        let mut live = Bm25::default();
        let mut model: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (id, op) in &ops {
            match op {
                Some(tags) => {
                    live.index(*id, &doc(tags));
                    model.insert(*id, tags.clone());
                }
                None => {
                    live.remove(*id);
                    model.remove(id);
                }
            }
        }
        let mut fresh = Bm25::default();
        for (id, tags) in &model {
            fresh.index(*id, &doc(tags));
        }
        prop_assert_eq!(live.len(), model.len());
        for q in &queries {
            let text = q.iter().map(|&t| TAGS[t]).collect::<Vec<_>>().join(" ");
            let a: BTreeMap<u32, f32> = live.query(&text, 100).into_iter().collect();
            let b: BTreeMap<u32, f32> = fresh.query(&text, 100).into_iter().collect();
            prop_assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (k, v) in &a {
                prop_assert!((v - b[k]).abs() < 1e-3, "{}: {} vs {}", k, v, b[k]);
            }
        }
    }
}
