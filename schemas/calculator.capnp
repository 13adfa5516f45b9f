# A calculator in the style of the Cap'n Proto examples, served over capsock
# (examples/rpc_calculator.py, tests/test_rpc_capnp.py).  Results are
# capabilities (Value, Function), so a client can pipeline: call read() on the
# Value of an evaluate() it has not waited for, in the same round trip.
@0x9e3a8107c52f6613;

interface Calculator {
  evaluate @0 (expression :Expression) -> (value :Value);
  # Evaluate an expression; the result is a Value capability.

  getOperator @1 (op :Operator) -> (func :Function);
  # A Function capability for one of the basic arithmetic operators.

  struct Expression {
    union {
      literal @0 :Float64;
      previousResult @1 :Value;
      # A Value returned by an earlier evaluate(), maybe not resolved yet.
      call :group {
        function @2 :Function;
        params @3 :List(Expression);
      }
    }
  }

  interface Value {
    read @0 () -> (value :Float64);
  }

  interface Function {
    call @0 (params :List(Float64)) -> (value :Float64);
  }

  enum Operator {
    add @0;
    subtract @1;
    multiply @2;
    divide @3;
  }
}
