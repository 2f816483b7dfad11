//! The provider node's tests over loopback, as one test binary: a host (the
//! broker's router, from core's testkit), the node library run as a task,
//! and its backends (stand-in model servers, real espeak-ng, pages served by
//! the test).

mod lifecycle;
mod services;
