//! Fuzz the A2A agent card parser (cards come from agents, i.e. outside
//! input): `cargo +nightly fuzz run agent_card`. A card that parses must
//! export, rewrite and re-parse without panicking.
#![no_main]

use dmsc_registry::AgentCard;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut card) = AgentCard::parse(data) {
        let _ = card.digest();
        card.rewrite_urls("http://agent.tenant.dmsc");
        let again = AgentCard::parse(&card.to_bytes());
        assert!(again.is_ok(), "a rewritten card must stay valid");
    }
});
