//! `spiderpool_api::manifest::parse_documents` on any text, then each parsed object through
//! what `spiderpoolctl apply` and the agent do with it: SpiderIPPool and SpiderSubnet specs
//! made into pools (their usable addresses, counts and overlaps), SpiderReservedIP specs into
//! address sets, and every object stored as JSON and read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spiderpool_api::manifest::{parse_documents, Object};

fuzz_target!(|data: &[u8]| {
    // `apply` reads its file as UTF-8 text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = parse_documents(text) else {
        return;
    };
    let mut pools = Vec::new();
    for doc in &docs {
        let object = &doc.object;
        let _ = (object.key(), object.describe());
        let pool = match object {
            Object::IPPool(p) => p.to_pool().ok(),
            Object::Subnet(s) => s.to_pool().ok(),
            Object::ReservedIP(r) => {
                if let Ok(set) = r.to_set() {
                    let _ = (set.len(), set.to_strings());
                }
                None
            }
            Object::MultusConfig(c) => {
                // What the webhook and the controller do with one: default, check, render.
                let mut c = c.clone();
                c.default_spec();
                if c.validate().is_ok() {
                    let _ = c.render().map(|nad| nad.to_object("o", "u"));
                }
                None
            }
            _ => None,
        };
        if let Some(pool) = pool {
            // What the agent does with a pool: count it, take its lowest free address or the
            // lowest of its stripe.
            let usable = pool.usable();
            let _ = (
                pool.total_ip_count(),
                usable.len(),
                usable.first(pool.family),
            );
            let _ = usable.first_in_stripe(pool.family, 1, 3);
            pools.push(pool);
        }
        // The datastore keeps the JSON form and reads it back on every load.
        let stored = object.to_value();
        let back = Object::from_value(object.kind(), stored)
            .unwrap_or_else(|e| panic!("{} does not read back: {e}", object.describe()));
        assert_eq!(&back, object, "{} changes when stored", object.describe());
    }
    // Overlap checks between pools of one apply, as the store runs them.
    for (i, a) in pools.iter().enumerate() {
        for b in &pools[i + 1..] {
            if a.family == b.family {
                let _ = a.ips.intersection(&b.ips).ranges().next();
                let _ = a.subnet.contains(&b.subnet.network());
            }
        }
    }
});
