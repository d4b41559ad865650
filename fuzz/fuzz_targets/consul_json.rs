//! Consul's answers as the client decodes them: any bytes are an error or a value, never a
//! panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use switchyard_consul::{AgentService, ServiceEntry};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Vec<ServiceEntry>>(data);
    let _ = serde_json::from_slice::<HashMap<String, AgentService>>(data);
    let _ = serde_json::from_slice::<HashMap<String, Vec<String>>>(data);
    if let Ok(entries) = serde_json::from_slice::<Vec<ServiceEntry>>(data) {
        for e in &entries {
            let _ = e.address();
        }
    }
});
