//! The update envelope: any bytes a webhook may receive. Parsing never
//! panics, and when the full parse accepts a body the routing parse (what
//! the ingress uses) accepts it with the same `update_id`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::telegram::{Incoming, RoutingInfo};

fuzz_target!(|data: &[u8]| {
    let routing = RoutingInfo::from_bytes(data);
    if let Ok((update_id, _)) = Incoming::parse(data) {
        let routing = routing.expect("a body the worker parses is routable");
        assert_eq!(routing.update_id, update_id);
    }
});
