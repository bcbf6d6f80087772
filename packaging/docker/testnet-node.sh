#!/bin/sh
# Entry point of the compose testnet's providers and client (packaging/compose.yaml):
# join the bootstrap node whose state volume is mounted at /boot, on loopback.
#   testnet-node.sh provider PORT SEED [serve options]
#   testnet-node.sh client [client options]
set -eu
role=$1
shift
boot_port=${BOOT_PORT:-4001}
# The bootstrap writes its keys on first start; `meshnode id` reads them (never creates:
# /boot is mounted read-only, so a missing key fails here instead of forking an identity).
tries=0
until boot_id=$(meshnode id --home /boot 2>/dev/null); do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || { echo "no bootstrap identity in /boot after 60 s" >&2; exit 1; }
    sleep 1
done
boot="/ip4/127.0.0.1/tcp/${boot_port}/p2p/${boot_id}"
case "$role" in
provider)
    port=$1 seed=$2
    shift 2
    model="$MESHNODE_HOME/tiny-${seed}.gguf"
    [ -f "$model" ] || python3 -c "import sys; from pathlib import Path; \
from meshnode.engine.tinymodel import write_tiny_llama; \
write_tiny_llama(Path(sys.argv[1]), seed=int(sys.argv[2]), name='tiny-' + sys.argv[2])" \
        "$model" "$seed"
    exec meshnode serve --model "${MODEL:-$model}" --ctx 512 \
        --listen "/ip4/127.0.0.1/tcp/${port}" --bootstrap "$boot" "$@"
    ;;
client)
    exec meshnode client --bootstrap "$boot" "$@"
    ;;
*)
    echo "usage: testnet-node.sh provider PORT SEED [serve options] | client [options]" >&2
    exit 2
    ;;
esac
