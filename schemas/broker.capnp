# Temporary capsock sockets handed out through Cap'n Proto.
#
# mint() returns a freshly minted capsock capability URI (as Text): a
# temporary socket on the server's node, bound to the calling node, with the
# requested lifetime and number of uses.  The caller opens it with
# Node.connect(uri).  The URI is a secret: it travels only inside the
# encrypted capsock stream that carries this interface.
@0x93b057f8f1386b69;

interface Broker {
  mint @0 (ttlSeconds :Float64, uses :UInt32, label :Text) -> (uri :Text);
  # A fresh temporary socket.  ttlSeconds <= 0 means no expiry, uses == 0
  # means no limit on opens; label is a short public text for logs.

  echo @1 (payload :Data) -> (payload :Data);
  # Returns the payload unchanged (round-trip and throughput checks).
}
