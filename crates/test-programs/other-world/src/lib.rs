//! A component of another world, for the "wrong world" test.
wit_bindgen::generate!({ world: "other", path: "wit" });

struct Other;

impl Guest for Other {
    fn hello() -> String {
        "hello from another world".to_string()
    }
}

export!(Other);
