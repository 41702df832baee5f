// pion/turn (Debian's golang-github-pion-turn.v2-dev) as bench/compare.py runs it: one user,
// UDP and TCP on -port, TLS on -tls-port, relays on -ip within -min-port..-max-port.  Its own
// example server listens on 0.0.0.0 and UDP only; this one binds what it is given.
//
// Built offline by compare.py:
//   GO111MODULE=off GOPATH=/usr/share/gocode go build -o pion-turn bench/pion_server.go
package main

import (
	"crypto/tls"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/pion/turn/v2"
)

func main() {
	ip := flag.String("ip", "127.0.0.1", "address to listen and relay on")
	port := flag.Int("port", 3478, "UDP and TCP port")
	tlsPort := flag.Int("tls-port", 5349, "TLS port")
	user := flag.String("user", "", "user name")
	password := flag.String("password", "", "password")
	realm := flag.String("realm", "pion.ly", "realm")
	cert := flag.String("cert", "", "certificate (PEM)")
	key := flag.String("key", "", "private key (PEM)")
	minPort := flag.Int("min-port", 10000, "lowest relay port")
	maxPort := flag.Int("max-port", 30000, "highest relay port")
	flag.Parse()

	relays := func() turn.RelayAddressGenerator {
		return &turn.RelayAddressGeneratorPortRange{
			RelayAddress: net.ParseIP(*ip), Address: *ip,
			MinPort: uint16(*minPort), MaxPort: uint16(*maxPort),
		}
	}
	address := net.JoinHostPort(*ip, strconv.Itoa(*port))
	udp, err := net.ListenPacket("udp", address)
	if err != nil {
		log.Fatalf("udp %s: %s", address, err)
	}
	tcp, err := net.Listen("tcp", address)
	if err != nil {
		log.Fatalf("tcp %s: %s", address, err)
	}
	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		log.Fatalf("certificate: %s", err)
	}
	secure, err := tls.Listen("tcp", net.JoinHostPort(*ip, strconv.Itoa(*tlsPort)),
		&tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair}})
	if err != nil {
		log.Fatalf("tls: %s", err)
	}
	keyOf := turn.GenerateAuthKey(*user, *realm, *password)
	server, err := turn.NewServer(turn.ServerConfig{
		Realm: *realm,
		AuthHandler: func(name string, _ string, _ net.Addr) ([]byte, bool) {
			return keyOf, name == *user
		},
		PacketConnConfigs: []turn.PacketConnConfig{{PacketConn: udp, RelayAddressGenerator: relays()}},
		ListenerConfigs: []turn.ListenerConfig{
			{Listener: tcp, RelayAddressGenerator: relays()},
			{Listener: secure, RelayAddressGenerator: relays()},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	if err = server.Close(); err != nil {
		log.Fatal(err)
	}
}
