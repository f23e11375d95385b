//! Test policy: a valid policy that also imports an interface the sandbox does not provide
//! (`test:net/fetch`, standing for `wasi:http`), as a JavaScript component built with
//! componentize-js's http feature does. Loading it must name the import.
use cachelock_policy_sdk::*;

mod net {
    wit_bindgen::generate!({
        inline: "package test:net;\ninterface fetch { get: func(url: string) -> string; }\nworld net { import fetch; }",
    });
}

struct Foreign;

impl Policy for Foreign {
    fn configure(config: &Config) -> Result<Self, String> {
        if let Some(url) = config.get("fetch") {
            log(Level::Info, &net::test::net::fetch::get(url));
        }
        Ok(Foreign)
    }
}

export_policy!(Foreign);
