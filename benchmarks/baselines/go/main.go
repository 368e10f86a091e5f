// Command mab-go is the Go baseline for mab_service: the same POST /predict contract and the same
// design (a table loaded at start, Marsaglia-Tsang Beta draws, partial selection of the top k), written
// the way a Go team would write it, on fasthttp with encoding/json. benchmarks/bench_service.py runs it
// as the "go" target; benchmarks/baselines/go/build.py builds it from Debian's packages.
//
//	mab-go -features table.csv [-host 127.0.0.1] [-port 8002] [-gomaxprocs 1]
package main

import (
	"flag"
	"fmt"
	"log"
	"math"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
)

// startupFailure is the exit code for a bad flag or feature table, as mab-service's STARTUP_FAILURE.
const startupFailure = 3

const shutdownTimeout = 10 * time.Second

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 8002, "TCP port")
	features := flag.String("features", "", "CSV feature table with the header entity_id,alpha,beta (required)")
	priorAlpha := flag.Float64("prior-alpha", 1, "prior alpha for unknown candidates")
	priorBeta := flag.Float64("prior-beta", 1, "prior beta for unknown candidates")
	maxCandidates := flag.Int("max-candidates", 10000, "most candidates one request may carry")
	maxBodyBytes := flag.Int("max-body-bytes", 1<<20, "largest body accepted")
	keepAlive := flag.Duration("timeout-keep-alive", 5*time.Second, "idle keep-alive timeout")
	procs := flag.Int("gomaxprocs", 0, "threads running Go code at once; 0 keeps the runtime's choice")
	flag.Parse()
	log.SetPrefix("mab-go: ")
	log.SetFlags(log.LstdFlags)

	fail := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "mab-go: "+format+"\n", args...)
		os.Exit(startupFailure)
	}
	switch {
	case *features == "":
		fail("-features is required")
	case !(*priorAlpha > 0) || math.IsInf(*priorAlpha, 0) || !(*priorBeta > 0) || math.IsInf(*priorBeta, 0):
		fail("-prior-alpha and -prior-beta must be finite and > 0")
	case *maxCandidates < 1 || *maxBodyBytes < 1 || *procs < 0:
		fail("-max-candidates and -max-body-bytes must be >= 1, -gomaxprocs >= 0")
	}
	if *procs > 0 {
		runtime.GOMAXPROCS(*procs)
	}
	t, err := loadTable(*features)
	if err != nil {
		fail("%v", err)
	}

	svc := newService(t, limits{*priorAlpha, *priorBeta, *maxCandidates, *maxBodyBytes})
	server := &fasthttp.Server{
		Handler:               svc.handle,
		ErrorHandler:          svc.handleTransportError,
		MaxRequestBodySize:    *maxBodyBytes,
		IdleTimeout:           *keepAlive,
		ReadTimeout:           30 * time.Second, // a client that stalls mid-request
		NoDefaultServerHeader: true,
		CloseOnShutdown:       true,
	}
	ln, err := net.Listen("tcp4", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		fail("%v", err)
	}
	served := make(chan error, 1)
	go func() { served <- server.Serve(ln) }()
	log.Printf("%d rows from %s, listening on %s, GOMAXPROCS=%d", len(t.alpha), *features, ln.Addr(), runtime.GOMAXPROCS(0))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-served:
		log.Fatalf("server stopped: %v", err)
	case sig := <-stop:
		log.Printf("%v: draining", sig)
		done := make(chan struct{})
		go func() {
			_ = server.Shutdown() // stops listening, then waits for open connections to finish
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(shutdownTimeout):
			log.Printf("connections still open after %v; exiting", shutdownTimeout)
		}
	}
}
