//! Host bindings for the `projector:plugin@0.1.0` worlds. A future contract version gets its own
//! module beside this one, so plugins built against this one keep loading.

pub mod projection {
    wasmtime::component::bindgen!({
        world: "projection",
        path: "../wit",
        imports: { default: trappable },
    });
}
