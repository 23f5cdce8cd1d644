#!/usr/bin/env python3
"""Drives a running `kleidi serve` with Python grpcio (C-core): an independent gRPC implementation.

It sends the HTTP/2 :authority kube-apiserver and other clients send, and calls every RPC of the
KMS v2 and v1beta1 services. Stubs are generated at run time from the repo's proto/ with grpc_tools.
Prints one JSON object with what it saw; exits non-zero on the first failed expectation.

    grpcio_client.py --socket /run/kleidi/kms.sock --authority {path,percent,localhost}
"""
import argparse
import importlib
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def load_stubs(proto_root, out_dir):
    files = ["k8s/kms/v2/api.proto", "k8s/kms/v1beta1/api.proto"]
    for f in files:
        rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f])
        if rc != 0:
            sys.exit(f"protoc failed for {f}")
    sys.path.insert(0, out_dir)
    v2 = importlib.import_module("k8s.kms.v2.api_pb2")
    v2g = importlib.import_module("k8s.kms.v2.api_pb2_grpc")
    v1 = importlib.import_module("k8s.kms.v1beta1.api_pb2")
    v1g = importlib.import_module("k8s.kms.v1beta1.api_pb2_grpc")
    return v2, v2g, v1, v1g


def expect(cond, what):
    if not cond:
        print(json.dumps({"ok": False, "failed": what}))
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--authority", choices=["path", "percent", "localhost"], required=True)
    ap.add_argument("--proto-root", default=os.path.join(os.path.dirname(__file__), "../../../proto"))
    args = ap.parse_args()

    options = []
    if args.authority == "path":
        # What kube-apiserver <= 1.31 sends: the socket path itself.
        options.append(("grpc.default_authority", args.socket))
    elif args.authority == "localhost":
        # What kube-apiserver >= 1.32 sends.
        options.append(("grpc.default_authority", "localhost"))
    # "percent": grpcio's own default for a unix: target, the %-encoded path.

    with tempfile.TemporaryDirectory() as out:
        v2, v2g, v1, v1g = load_stubs(os.path.abspath(args.proto_root), out)
        channel = grpc.insecure_channel(f"unix:{args.socket}", options=options)
        grpc.channel_ready_future(channel).result(timeout=10)
        kms2 = v2g.KeyManagementServiceStub(channel)
        kms1 = v1g.KeyManagementServiceStub(channel)
        seen = {"authority": args.authority}

        status = kms2.Status(v2.StatusRequest(), timeout=3)
        expect(status.version == "v2" and status.healthz == "ok" and status.key_id, f"v2 Status: {status}")
        seed = os.urandom(32)
        enc = kms2.Encrypt(v2.EncryptRequest(plaintext=seed, uid="grpcio-interop"), timeout=3)
        expect(enc.key_id == status.key_id, "v2 Encrypt key_id differs from Status key_id")
        dec = kms2.Decrypt(
            v2.DecryptRequest(ciphertext=enc.ciphertext, uid="grpcio-interop", key_id=enc.key_id,
                              annotations=dict(enc.annotations)),
            timeout=3,
        )
        expect(dec.plaintext == seed, "v2 Decrypt did not return the seed")
        tampered = bytearray(enc.ciphertext)
        tampered[-1] ^= 0x01
        try:
            kms2.Decrypt(v2.DecryptRequest(ciphertext=bytes(tampered), uid="grpcio-interop", key_id=enc.key_id,
                                           annotations=dict(enc.annotations)), timeout=3)
            expect(False, "tampered ciphertext decrypted")
        except grpc.RpcError as e:
            expect(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"tampered ciphertext gave {e.code()}")
        seen["v2"] = {"key_id": status.key_id, "ciphertext_len": len(enc.ciphertext),
                      "annotations": sorted(enc.annotations.keys())}

        version = kms1.Version(v1.VersionRequest(version="v1beta1"), timeout=3)
        expect(version.version == "v1beta1" and version.runtime_name == "kleidi", f"v1 Version: {version}")
        dek = os.urandom(32)
        enc1 = kms1.Encrypt(v1.EncryptRequest(version="v1beta1", plain=dek), timeout=3)
        dec1 = kms1.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=enc1.cipher), timeout=3)
        expect(dec1.plain == dek, "v1 Decrypt did not return the DEK")
        seen["v1beta1"] = {"runtime_version": version.runtime_version, "cipher_len": len(enc1.cipher)}
        seen["ok"] = True
        print(json.dumps(seen))


if __name__ == "__main__":
    main()
