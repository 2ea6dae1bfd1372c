//! The wasm panic hook (`sdxl::web::set_panic_hook`): a panic reports its message and location to
//! the worker's callback before the trap that JS sees as "RuntimeError: unreachable". The engine
//! has no panic reachable from its API, so the test panics in a closure of its own, called from JS
//! that catches the trap (tests/e2e step 10 checks the worker's `InternalError` and restart).
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use wasm_bindgen::prelude::*;
use wasm_bindgen_test::wasm_bindgen_test;

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_dedicated_worker);

#[wasm_bindgen(inline_js = "export function callCatching(f) { try { f(); return 'returned'; } catch (e) { return `${e.constructor.name}: ${e.message}`; } }")]
extern "C" {
    #[wasm_bindgen(js_name = callCatching)]
    fn call_catching(f: &Closure<dyn Fn()>) -> String;
}

#[wasm_bindgen_test]
fn a_panic_reports_its_message_before_the_trap() {
    let reported = Rc::new(RefCell::new(Vec::<String>::new()));
    let sink = reported.clone();
    let report = Closure::<dyn Fn(String)>::new(move |message: String| sink.borrow_mut().push(message));
    sdxl::web::set_panic_hook(report.as_ref().unchecked_ref::<js_sys::Function>().clone());

    let fine = Closure::<dyn Fn()>::new(|| ());
    assert_eq!(call_catching(&fine), "returned");
    assert!(reported.borrow().is_empty(), "no panic, no report");

    let index = 7;
    let panics = Closure::<dyn Fn()>::new(move || panic!("tensor {index} is out of range"));
    let trap = call_catching(&panics);
    assert!(trap.starts_with("RuntimeError: unreachable"), "the trap JS sees: {trap}");
    let reported = reported.borrow();
    assert_eq!(reported.len(), 1, "one report: {reported:?}");
    assert!(reported[0].contains("tensor 7 is out of range") && reported[0].contains("panic_hook.rs"), "message and location: {}", reported[0]);
}
