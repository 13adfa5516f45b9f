"""Generate tests/data/uris.json independently of capsock.uri (hashlib + struct)."""
import base64, hashlib, ipaddress, json, struct, sys, urllib.parse
import nacl.signing

def node_text(seed):
    pk = bytes(nacl.signing.SigningKey(seed).verify_key)
    return base64.b32encode(pk).decode().rstrip("=").lower(), pk

def b2b(key, person, data):
    return hashlib.blake2b(data, digest_size=32, key=key, person=person).digest()

def enc_cav(c):
    (k, v), = c.items()
    if k == "exp": kind, val = 1, struct.pack(">Q", v)
    elif k == "uses": kind, val = 2, struct.pack(">I", v)
    elif k == "peer": kind, val = 3, NODES_BY_TEXT[v]
    elif k == "label": kind, val = 4, v.encode()
    elif k == "to": kind, val = 5, NODES_BY_TEXT[v]
    elif k == "unknown": kind, val = v[0], bytes.fromhex(v[1])
    return bytes([kind, len(val)]) + val

def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

SEEDS = {
    "A": bytes(range(0, 32)), "B": bytes(range(32, 64)), "R": bytes(range(64, 96)),
    "C": bytes(range(96, 128)), "D": bytes(range(128, 160)),
}
NODES = {n: node_text(s) for n, s in SEEDS.items()}
NODES_BY_TEXT = {t: pk for t, pk in NODES.values()}
NODES_PK_TEXT = {pk: t for t, pk in NODES.values()}
ROOT_KEYS = {n: bytes([0xA0 + i] * 32) for i, n in enumerate(SEEDS)}
ROOT_IDS = {n: bytes.fromhex("00112233445566778899aabbccddee%02x" % i) for i, n in enumerate(SEEDS)}

MADE = {}  # uri -> record, for the compact via form

def compact(inner, outer_pk):
    """The v= value of a via hint (docs/protocol.md 4.1), or None where the long form applies."""
    cavs = inner["caveats"]
    if not cavs or cavs[-1] != {"to": NODES_PK_TEXT[outer_pk]}: return None
    if any("via" in h for h in inner["hints"]): return None
    out = NODES_BY_TEXT[inner["node"]] + bytes.fromhex(inner["root_id"]) + bytes.fromhex(inner["tag"])
    for c in cavs[:-1]: out += b"\x00" + enc_cav(c)
    for h in inner["hints"]:
        (k, v), = h.items()
        if k == "unix":
            out += bytes([4, len(v.encode())]) + v.encode()
            continue
        host, port = v
        try: ip = ipaddress.ip_address(host)
        except ValueError: out += bytes([3, len(host)]) + host.encode() + struct.pack(">H", port)
        else: out += bytes([1 if ip.version == 4 else 2]) + ip.packed + struct.pack(">H", port)
    return b64(out)

def hint_text(h, outer_pk):
    (k, v), = h.items()
    if k == "tcp":
        host, port = v
        return f"tcp=[{host}]:{port}" if ":" in host else f"tcp={host}:{port}"
    if k == "unix": return "unix=" + urllib.parse.quote(v, safe="/")
    c = compact(MADE[v], outer_pk)
    if c is not None: return "v=" + c
    return "via=" + urllib.parse.quote(v, safe="")

def make(name, n, caveats=(), hints=()):
    node, _ = NODES[n]
    rk, rid = ROOT_KEYS[n], ROOT_IDS[n]
    chain = [b2b(rk, b"capsock/1 root", rid)]
    for c in caveats:
        chain.append(b2b(chain[-1], b"capsock/1 caveat", enc_cav(c)))
    token = bytes([1]) + rid + bytes([len(caveats)]) + b"".join(enc_cav(c) for c in caveats) + chain[-1]
    uri = f"capsock://{node}/{b64(token)}"
    if hints: uri += "?" + "&".join(hint_text(h, NODES[n][1]) for h in hints)
    MADE[uri] = rec = {"name": name, "uri": uri, "node": node, "node_seed": SEEDS[n].hex(),
            "root_key": rk.hex(), "root_id": rid.hex(), "caveats": list(caveats),
            "hints": list(hints), "chain": [t.hex() for t in chain], "tag": chain[-1].hex(),
            "token": token.hex()}
    return rec

B = NODES["B"][0]
valid = []
valid.append(make("root-plain", "A"))
valid.append(make("root-tcp4", "A", hints=[{"tcp": ["127.0.0.1", 4433]}]))
valid.append(make("all-caveats-tcp6-dns", "A",
    caveats=[{"exp": 1767225600}, {"uses": 3}, {"peer": B}, {"label": "demo"}],
    hints=[{"tcp": ["::1", 4433]}, {"tcp": ["relay.example.com", 443]}]))
valid.append(make("limits", "B",
    caveats=[{"exp": 2**64 - 1}, {"uses": 2**32 - 1}, {"exp": 0}, {"uses": 1}, {"label": "x" * 64}],
    hints=[{"tcp": ["2001:db8::1", 65535]}, {"tcp": ["10.0.0.1", 1]}]))
valid.append(make("unicode-label-unix", "C",
    caveats=[{"label": "caf\u00e9 \u2615 \u0434\u0435\u043c\u043e"}],
    hints=[{"unix": "/run/capsock/node a+b\u00e9.sock"}, {"unix": "/tmp/x"}]))
valid.append(make("unknown-caveat", "D",
    caveats=[{"exp": 1767225600}, {"unknown": [200, "68656c6c6f"]}, {"unknown": [0, ""]}],
    hints=[{"tcp": ["localhost", 8080]}]))
relay = make("relay", "R", hints=[{"tcp": ["198.51.100.7", 443]}, {"tcp": ["xn--caf-dma.example", 443]}])
valid.append(relay)
via1 = make("via-1", "C", caveats=[{"uses": 1}, {"peer": B}],
            hints=[{"via": relay["uri"]}, {"unix": "/run/c.sock"}])
valid.append(via1)
d = make("via-depth0", "D", hints=[{"tcp": ["192.0.2.1", 7000]}])
c = make("via-depth1", "C", caveats=[{"label": "hop"}], hints=[{"via": d["uri"]}])
r = make("via-depth2", "R", hints=[{"via": c["uri"]}, {"tcp": ["::", 9]}])
a = make("via-depth3", "A", caveats=[{"exp": 1}], hints=[{"via": r["uri"]}])
valid += [d, c, r, a]
many = make("sixteen-hints", "B", hints=[{"tcp": ["127.0.0.1", p]} for p in range(1000, 1016)])
valid.append(many)

# Compact via hints (v=): the forwarder capability ends with to=<outer node>.
A_TEXT = NODES["A"][0]
relay_lo = make("x", "R", hints=[{"tcp": ["127.0.0.1", 45123]}])
relay_to_a = make("x", "R", caveats=[{"to": A_TEXT}], hints=[{"tcp": ["127.0.0.1", 45123]}])
relayed = make("relayed-compact", "A", hints=[{"via": relay_to_a["uri"]}])
valid.append(relayed)
relay_rich = make("x", "R", caveats=[{"exp": 1767225600}, {"label": "relay"}, {"to": A_TEXT}],
    hints=[{"tcp": ["198.51.100.7", 443]}, {"tcp": ["2001:db8::7", 443]},
           {"tcp": ["relay.example.com", 4433]}, {"unix": "/run/relay \u00e9.sock"}])
valid.append(make("compact-all-items", "A", caveats=[{"uses": 1}],
    hints=[{"tcp": ["192.0.2.1", 7000]}, {"via": relay_rich["uri"]}]))
relay_bare_to_a = make("x", "R", caveats=[{"to": A_TEXT}])
relay_to_b = make("x", "R", caveats=[{"to": B}], hints=[{"tcp": ["127.0.0.1", 45123]}])
valid.append(make("compact-and-long", "A",
    hints=[{"via": relay_bare_to_a["uri"]}, {"via": relay_to_b["uri"]}]))
# The same capabilities in the long form (what URIs written before v= existed say):
# they parse, to the same capability, whose text is the compact one.
def long_form(rec):
    return rec["uri"].split("?")[0] + "?" + "&".join(
        "via=" + urllib.parse.quote(h["via"], safe="") if "via" in h
        else hint_text(h, None) for h in rec["hints"])
legacy = [{"uri": long_form(v), "canonical": v["uri"]} for v in valid if "v=" in v["uri"]]
# A long-form via whose nested URI is in the long form too, one level down.
hop_to_r = make("x", "C", caveats=[{"to": NODES["R"][0]}], hints=[{"tcp": ["192.0.2.9", 9]}])
relay_via_hop = make("x", "R", caveats=[{"label": "hop"}], hints=[{"via": hop_to_r["uri"]}])
nested = make("x", "A", hints=[{"via": relay_via_hop["uri"]}])
assert "v=" in relay_via_hop["uri"] and "via=" in nested["uri"]
legacy.append({"uri": nested["uri"].replace(
    urllib.parse.quote(relay_via_hop["uri"], safe=""),
    urllib.parse.quote(long_form(relay_via_hop), safe="")), "canonical": nested["uri"]})

base = valid[0]
NODE, TOK = base["node"], b64(bytes.fromhex(base["token"]))
U = f"capsock://{NODE}/{TOK}"
tag = bytes.fromhex(base["tag"]); rid = bytes.fromhex(base["root_id"])
def tokuri(raw): return f"capsock://{NODE}/{b64(raw)}"
def t(cavbytes, count, version=1, extra=b"", tg=None):
    return bytes([version]) + rid + bytes([count]) + cavbytes + (tag if tg is None else tg) + extra

# non-canonical base64: flip the lowest (padding) bit of the last character
alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
assert len(TOK) % 4 != 0 and NODE[-1] in "aq"
noncanon = TOK[:-1] + alpha[alpha.index(TOK[-1]) | 1]
assert noncanon != TOK

deep = make("x", "B", hints=[{"via": a["uri"]}])["uri"]

# Compact via values for node A (the node of U): relay R's root token, to=A elided.
R_TEXT, R_PK = NODES["R"]
r_root_tag = b2b(ROOT_KEYS["R"], b"capsock/1 root", ROOT_IDS["R"])
r_tag_to_a = b2b(r_root_tag, b"capsock/1 caveat", enc_cav({"to": NODE}))
def cv(items): return b64(R_PK + ROOT_IDS["R"] + r_tag_to_a + items)
CV = cv(b"")  # 80 bytes: 107 characters
CV_LONG = f"capsock://{R_TEXT}/" + b64(bytes([1]) + ROOT_IDS["R"] + b"\x01" + enc_cav({"to": NODE}) + r_tag_to_a)
cv83 = cv(b"\x04\x01/")
assert len(cv83) % 4 == 3
cvnoncanon = cv83[:-1] + alpha[alpha.index(cv83[-1]) | 1]
assert cvnoncanon != cv83
invalid = [
    ("", "not a capsock URI"),
    ("http://example.com/", "not a capsock URI"),
    ("capsock:" + U[8:].replace("//", "/", 1), "not a capsock URI"),
    ("CAPSOCK://" + U[10:], "lower-case"),
    ("Capsock://" + U[10:], "lower-case"),
    (" " + U, "whitespace"),
    (U + " ", "whitespace"),
    (U + "\n", "whitespace"),
    (U + "\x00", "control or non-ASCII"),
    (U + "?unix=/caf\u00e9", "non-ASCII"),
    (f"capsock://user@{NODE}/{TOK}", "userinfo"),
    (f"capsock://{NODE}:4433/{TOK}", "port is not allowed"),
    (U + "#frag", "fragment"),
    (U + "?tcp=127.0.0.1:1#frag", "fragment"),
    (U + "/extra", "extra path segments"),
    (f"capsock://{NODE}", "token is missing"),
    (f"capsock://{NODE}/", "token is missing"),
    (f"capsock://{NODE}/?tcp=127.0.0.1:1", "token is missing"),
    (f"capsock:///{TOK}", "node id is missing"),
    (f"capsock://{NODE.upper()}/{TOK}", "node id"),
    (f"capsock://{NODE[:-1]}/{TOK}", "node id"),
    (f"capsock://{NODE}a/{TOK}", "node id"),
    (f"capsock://{NODE[:-1]}b/{TOK}", "non-zero trailing bits"),  # last char is 'a' or 'q' 
    (U + "==", "padding"),
    (U[:-1] + "+", "not base64url"),
    (U[:-1] + "%41", "not base64url"),
    (U[:-1] + ".", "not base64url"),
    (f"capsock://{NODE}/{noncanon}", "non-zero padding bits"),
    (f"capsock://{NODE}/{TOK}AA", "impossible base64url length"),
    (tokuri(t(b"", 0, version=2)), "unsupported token version 2"),
    (tokuri(t(b"", 0, version=0)), "unsupported token version 0"),
    (tokuri(t(b"", 0)[:-1]), "truncated"),
    (tokuri(t(b"", 0)[:20]), "truncated"),
    (tokuri(t(b"", 0, extra=b"\x00")), "trailing byte(s)"),
    (tokuri(t(b"", 1)), "truncated"),
    (tokuri(t(b"\x01\x07" + b"\x00" * 7, 1)), "exp caveat value is 7 bytes, expected 8"),
    (tokuri(t(b"\x02\x08" + b"\x00" * 8, 1)), "uses caveat value is 8 bytes, expected 4"),
    (tokuri(t(b"\x03\x1f" + b"\x00" * 31, 1)), "peer caveat value is 31 bytes, expected 32"),
    (tokuri(t(b"\x02\x04\x00\x00\x00\x00", 1)), "uses caveat count is zero"),
    (tokuri(t(b"\x04\x00", 1)), "label caveat must be 1..64 bytes (got"),
    (tokuri(t(b"\x04\x41" + b"a" * 65, 1)), "label caveat must be 1..64 bytes (got"),
    (tokuri(t(b"\x04\x03a\nb", 1)), "control character"),
    (tokuri(t(b"\x04\x04a\xe2\x80\xae", 1)), "control character (U+202E)"),
    (tokuri(t(b"\x04\x02\xff\xfe", 1)), "label caveat is not valid UTF-8"),
    (tokuri(t(b"\x02\x04\x00\x00\x00\x01" * 33, 33)), "too many caveats (33 > 32)"),
    (U + "?", "empty query string"),
    (U + "?tcp", "hint 1 has no '='"),
    (U + "?tcp=127.0.0.1:1&", "hint 2 has no '='"),
    (U + "?tcp=127.0.0.1:1&&tcp=127.0.0.1:2", "hint 2 has no '='"),
    (U + "?=x", "hint 1 has an empty key"),
    (U + "?foo=bar", "unknown hint key 'foo'"),
    (U + "?TCP=127.0.0.1:1", "unknown hint key 'TCP'"),
    (U + "?advertise=127.0.0.1:1", "unknown hint key 'advertise'"),
    (U + "?tcp=", "empty value for hint 'tcp'"),
    (U + "?unix=", "empty value for hint 'unix'"),
    (U + "?via=", "empty value for hint 'via'"),
    (U + "?tcp=%zz", "invalid percent-escape"),
    (U + "?unix=/a%4", "invalid percent-escape"),
    (U + "?unix=/a%FF", "not UTF-8"),
    (U + "?tcp=127.0.0.1", "missing ':PORT'"),
    (U + "?tcp=127.0.0.1:", "port must be 1..65535"),
    (U + "?tcp=127.0.0.1:0", "port must be 1..65535"),
    (U + "?tcp=127.0.0.1:080", "port must be 1..65535"),
    (U + "?tcp=127.0.0.1:65536", "port must be 1..65535"),
    (U + "?tcp=127.0.0.1:-1", "port must be 1..65535"),
    (U + "?tcp=127.0.0.1:http", "port must be 1..65535"),
    (U + "?tcp=:80", "tcp hint host is empty"),
    (U + "?tcp=01.2.3.4:80", "not a valid IPv4 address"),
    (U + "?tcp=1.2.3.256:80", "not a valid IPv4 address"),
    (U + "?tcp=1.2.3:80", "not a valid IPv4 address"),
    (U + "?tcp=::1:80", "must be in brackets"),
    (U + "?tcp=[::1]80", "expected ':PORT' after ']'"),
    (U + "?tcp=[::1:80", "missing ']'"),
    (U + "?tcp=[1.2.3.4]:80", "brackets are only for IPv6"),
    (U + "?tcp=[]:80", "brackets are only for IPv6"),
    (U + "?tcp=[0::1]:80", "not in canonical form (expected ::1)"),
    (U + "?tcp=[2001:DB8::1]:80", "not in canonical form (expected 2001:db8::1)"),
    (U + "?tcp=[2001:db8:0:0:0:0:0:1]:80", "not in canonical form"),
    (U + "?tcp=[::ffff:1.2.3.4]:80", "IPv4-mapped"),
    (U + "?tcp=[fe80::1%25eth0]:80", "zone ids"),
    (U + "?tcp=[::g]:80", "not a valid IPv6 address"),
    (U + "?tcp=Example.com:80", "not in canonical form (expected example.com)"),
    (U + "?tcp=exa_mple.com:80", "not a valid DNS name"),
    (U + "?tcp=example.com.:80", "not a valid DNS name"),
    (U + "?tcp=-a.example:80", "not a valid DNS name"),
    (U + "?tcp=a-.example:80", "not a valid DNS name"),
    (U + "?tcp=a..example:80", "not a valid DNS name"),
    (U + "?tcp=" + "a" * 64 + ".example:80", "not a valid DNS name"),
    (U + "?tcp=" + ".".join(["a" * 63] * 4) + ":80", "longer than 253"),
    (U + "?tcp=a.123:80", "cannot be all digits"),
    (U + "?tcp=%31.2.3.4:80", "tcp hint is not in canonical form"),
    (U + "?tcp=%5B::1%5D:80", "tcp hint is not in canonical form (expected 'tcp=[::1]:80')"),
    (U + "?tcp=caf%C3%A9.example:80", "must be ASCII"),
    (U + "?unix=relative.sock", "must be absolute"),
    (U + "?unix=/a%00b", "contains NUL"),
    (U + "?unix=/" + "a" * 107, "108 bytes, at most 107"),
    (U + "?unix=/a+b", "not in canonical form (expected 'unix=/a%2Bb')"),
    (U + "?unix=%2Ftmp%2Fx", "not in canonical form (expected 'unix=/tmp/x')"),
    (U + "?unix=/a%c3%a9", "not in canonical form"),
    (U + "?unix=/%41", "not in canonical form (expected 'unix=/A')"),
    (U + "?via=" + relay["uri"].split("?")[0], "via hint is not in canonical form"),
    (U + "?via=" + urllib.parse.quote(relay["uri"], safe="").lower(), "via hint"),
    (U + "?via=" + urllib.parse.quote("http://x/", safe=""), "via hint: not a capsock URI"),
    (U + "?via=" + urllib.parse.quote(U + "?foo=1", safe=""), "via hint: unknown hint key 'foo'"),
    (U + "?via=" + urllib.parse.quote(U + "?tcp=1.2.3.4:0", safe=""), "via hint: tcp hint: port"),
    (deep, "nested deeper than 3"),
    (U + "?" + "&".join(f"tcp=127.0.0.1:{p}" for p in range(1, 18)), "too many hints (17 > 16)"),
    (U + "?tcp=127.0.0.1:1&unix=/x&tcp=127.0.0.1:1", "duplicate hint"),
    (U + "?unix=/" + "a" * 4096, "longer than 4096"),
    (U + "?v=", "empty value for hint 'v'"),
    (U + "?v=" + CV + "=", "v hint: value must be base64url without '=' padding"),
    (U + "?v=" + CV[:-1] + "%41", "v hint: value is not base64url"),
    (U + "?v=" + CV + "AA", "v hint: value has an impossible base64url length"),
    (U + "?v=" + b64((R_PK + ROOT_IDS["R"] + r_tag_to_a)[:79]), "v hint: truncated (79 bytes, at least 80)"),
    (U + "?v=" + cv(b"\x09"), "v hint: item 1: unknown item type 9"),
    (U + "?v=" + cv(b"\x01\x7f\x00\x00\x01\x00"), "v hint: truncated in item 1"),
    (U + "?v=" + cv(b"\x00\x01\x08\x00"), "v hint: truncated in item 1"),
    (U + "?v=" + cv(b"\x03\x05ab"), "v hint: truncated in item 1"),
    (U + "?v=" + cv(b"\x01\x7f\x00\x00\x01\x00\x01\x00\x02\x04\x00\x00\x00\x01"),
     "v hint: item 2: a caveat after a hint"),
    (U + "?v=" + cv(b"\x00\x02\x04\x00\x00\x00\x00"), "v hint: item 1: uses caveat count is zero"),
    (U + "?v=" + cv(b"\x00\x02\x04\x00\x00\x00\x01" * 32), "v hint: too many caveats (33 > 32)"),
    (U + "?v=" + cv(b"\x01\x7f\x00\x00\x01\x00\x00"), "v hint: tcp hint port must be in 1..65535"),
    (U + "?v=" + cv(b"\x02" + bytes(10) + b"\xff\xff\x01\x02\x03\x04\x00\x50"), "IPv4-mapped"),
    (U + "?v=" + cv(b"\x03\x07" + b"1.2.3.4" + b"\x00\x50"), "v hint: not in canonical form"),
    (U + "?v=" + cv(b"\x03\x09" + b"Relay.net" + b"\x00\x50"), "v hint: not in canonical form"),
    (U + "?v=" + cv(b"\x03\x05" + b"r\xc3\xa9.x" + b"\x00\x50"), "v hint: item 1: not valid text"),
    (U + "?v=" + cv(b"\x04\x02\xff\xfe"), "v hint: item 1: not valid text"),
    (U + "?v=" + cv(b"\x04\x03a.b"), "v hint: unix hint path must be absolute"),
    (U + "?v=" + cvnoncanon, "v hint: value is not canonical base64url"),
    (U + "?v=" + CV + "&via=" + urllib.parse.quote(CV_LONG, safe=""), "duplicate hint"),
]
invalid_json = [{"uri": u, "error": e} for u, e in invalid]
invalid_tokens = [
    {"hex": "", "error": "token is empty"},
    {"hex": t(b"", 0, version=2).hex(), "error": "unsupported token version 2"},
    {"hex": t(b"", 0)[:-1].hex(), "error": "truncated"},
    {"hex": t(b"", 0, extra=b"\x00\x00").hex(), "error": "2 trailing byte(s)"},
    {"hex": t(b"\x01\x08" + b"\x00" * 8, 2).hex(), "error": "truncated"},
    {"hex": t(b"\x01\x09" + b"\x00" * 9, 1).hex(), "error": "exp caveat value is 9 bytes"},
    {"hex": t(b"\x02\x04\x00\x00\x00\x00", 1).hex(), "error": "uses caveat count is zero"},
    {"hex": t(b"\x04\x01\x7f", 1).hex(), "error": "control character (U+007F)"},
    {"hex": t(b"\x04\x03\xed\xa0\x80", 1).hex(), "error": "not valid UTF-8"},
    {"hex": t(b"", 33).hex(), "error": "too many caveats (33 > 32)"},
    {"hex": t(b"", 255).hex(), "error": "too many caveats (255 > 32)"},
]
doc = {
    "_comment": [
        "Golden capability URIs for tests/test_uri.py, generated by an implementation independent of "
        "capsock.uri (Python hashlib.blake2b, struct, base64, urllib.parse.quote).",
        "Nodes: Ed25519 seeds A=bytes(0..31), B=bytes(32..63), R=bytes(64..95), C=bytes(96..127), "
        "D=bytes(128..159); node id = lower-case unpadded base32 of the public key.",
        "Root keys: A=a0*32, B=a1*32, R=a2*32, C=a3*32, D=a4*32 (hex byte repeated 32 times). "
        "Root ids: 00112233445566778899aabbccddee00 (A), ...01 (B), ...02 (R), ...03 (C), ...04 (D).",
        "chain[0] = blake2b(root_id, digest_size=32, key=root_key, person=b'capsock/1 root'); "
        "chain[i] = blake2b(kind|len|value of caveat i, digest_size=32, key=chain[i-1], "
        "person=b'capsock/1 caveat'); tag = chain[-1].",
        "token = 01 | root_id | n | caveats | tag (hex); uri token = base64url(token) without padding. "
        "Caveat values: exp u64 BE, uses u32 BE, peer raw 32-byte key (given as node id text), label UTF-8, "
        "unknown = [kind, value hex].",
        "Hints: tcp [host, port] (IPv6 in brackets in the URI), unix path (quote(path, safe='/')), "
        "via = the inner URI; written as v=<compact> where its capability ends with to=<outer node> "
        "and has tcp/unix hints only (docs/protocol.md 4.1), else via=quote(uri, safe='').",
        "legacy: long-form URIs written before the compact form; they must parse to the capability "
        "whose text is 'canonical'.",
        "invalid: URIs that must raise InvalidCapability whose message contains 'error'; most reuse the "
        "token of 'root-plain'. invalid_tokens: binary tokens for Token.decode.",
    ],
    "valid": valid,
    "invalid": invalid_json,
    "invalid_tokens": invalid_tokens,
    "legacy": legacy,
}
json.dump(doc, sys.stdout, indent=1, ensure_ascii=True)
sys.stdout.write("\n")
