// Command pubsub-emulator serves Google's Pub/Sub fake (cloud.google.com/go/pubsub/v2/pstest) over
// gRPC for tests: clients reach it through PUBSUB_EMULATOR_HOST=<host:port>.
//
//	go build -o pubsub-emulator . && ./pubsub-emulator --host-port 127.0.0.1:8085
//
// Built and started by tests/pubsub_emulator.py. It prints "listening on <host:port>" once the
// port is bound, keeps everything in memory and exits 0 on SIGTERM or SIGINT.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/v2/pstest"
)

func main() {
	hostPort := flag.String("host-port", "127.0.0.1:8085", "address to listen on (host:port; port 0 picks a free one)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("pubsub-emulator: ")

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	srv, err := newServer(*hostPort)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *hostPort, err)
	}
	fmt.Printf("listening on %s\n", srv.Addr)
	os.Stdout.Sync()

	sig := <-stop
	log.Printf("%v: shutting down", sig)
	if err := srv.Close(); err != nil {
		log.Fatalf("close: %v", err)
	}
}

// newServer turns pstest's panic on a failed listen (e.g. the port is taken) into an error.
func newServer(hostPort string) (srv *pstest.Server, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	return pstest.NewServerWithAddress(hostPort), nil
}
