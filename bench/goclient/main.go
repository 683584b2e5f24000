// Target Bg's client: the gateway's language (Go, grpc-go) driving worker B.
//
// The real gateway is a Go program; the Python client of target B spends CPU
// on the same core as the engine's loop, which a Go gateway would mostly not.
// This client speaks the bench's control protocol (JSON lines on the socket
// passed as --fd, ops ping/run/results/quit, see bench/common.py) and runs the
// raw workloads exactly as bench/grpc_client.py does: one channel,
// PredictStream with Prompt, Temperature 0, IgnoreEOS, Tokens.
//
// No generated stubs: requests are encoded and replies decoded by hand (four
// PredictOptions fields, three Reply fields), with a pass-through codec.
//
// Built by bench/run.py (GOPATH mode against Debian's golang-google-grpc-dev)
// when `go` is installed; otherwise target Bg is skipped.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func appendVarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

// predictOptions encodes Prompt=1 (string), Tokens=4 (int32), IgnoreEOS=14
// (bool); Temperature=9 is 0.0, proto3's default, so it is not sent.
func predictOptions(prompt string, tokens int) []byte {
	b := appendVarint(nil, 1<<3|2)
	b = appendVarint(b, uint64(len(prompt)))
	b = append(b, prompt...)
	b = appendVarint(b, 4<<3|0)
	b = appendVarint(b, uint64(tokens))
	b = appendVarint(b, 14<<3|0)
	return appendVarint(b, 1)
}

func readVarint(b []byte) (uint64, int) {
	var v uint64
	for i := 0; i < len(b) && i < 10; i++ {
		v |= uint64(b[i]&0x7f) << (7 * uint(i))
		if b[i] < 0x80 {
			return v, i + 1
		}
	}
	return 0, -1
}

type reply struct {
	hasOutput bool // message or chat_deltas non-empty
	tokens    int64
	promptMs  float64
}

func decodeReply(b []byte) (reply, error) {
	var r reply
	for len(b) > 0 {
		key, n := readVarint(b)
		if n < 0 {
			return r, fmt.Errorf("bad varint")
		}
		b = b[n:]
		field, wire := key>>3, key&7
		switch wire {
		case 0:
			v, n := readVarint(b)
			if n < 0 {
				return r, fmt.Errorf("bad varint")
			}
			b = b[n:]
			if field == 2 {
				r.tokens = int64(v)
			}
		case 1:
			if len(b) < 8 {
				return r, fmt.Errorf("short fixed64")
			}
			if field == 4 {
				r.promptMs = math.Float64frombits(binary.LittleEndian.Uint64(b))
			}
			b = b[8:]
		case 2:
			l, n := readVarint(b)
			if n < 0 || uint64(len(b)-n) < l {
				return r, fmt.Errorf("bad length")
			}
			if (field == 1 || field == 8) && l > 0 {
				r.hasOutput = true
			}
			b = b[n+int(l):]
		case 5:
			b = b[4:]
		default:
			return r, fmt.Errorf("wire type %d", wire)
		}
	}
	return r, nil
}

// The same ~40-token prompt per request index as bench/common.py prompt_text.
func promptText(i int) string {
	return fmt.Sprintf("Request %d. Summarise the following notes about the weather in Paris, "+
		"the trains to Lyon and the opening hours of the museum, in plain words.", i)
}

type workload struct {
	Name        string `json:"name"`
	Concurrency int    `json:"concurrency"`
	Requests    int    `json:"requests"`
	Tokens      int    `json:"tokens"`
	Kind        string `json:"kind"`
}

type record struct {
	sent     time.Time
	stamps   []time.Time
	tokens   int64
	messages int
	err      string
	serverMs *float64
}

func round(v float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}

func (r *record) summary(origin time.Time) map[string]interface{} {
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	out := map[string]interface{}{
		"start_s":        round(r.sent.Sub(origin).Seconds(), 6),
		"tokens":         r.tokens,
		"chunks":         len(r.stamps),
		"messages":       r.messages,
		"error":          r.err,
		"server_ttft_ms": r.serverMs,
		"ttft_ms":        nil,
	}
	end := r.sent
	gaps := []float64{}
	if len(r.stamps) > 0 {
		end = r.stamps[len(r.stamps)-1]
		out["ttft_ms"] = round(ms(r.stamps[0].Sub(r.sent)), 4)
		for i := 1; i < len(r.stamps); i++ {
			gaps = append(gaps, round(ms(r.stamps[i].Sub(r.stamps[i-1])), 4))
		}
	}
	out["end_s"] = round(end.Sub(origin).Seconds(), 6)
	out["gaps_ms"] = gaps
	return out
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func one(conn *grpc.ClientConn, i int, w workload, rec *record) error {
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Second)
	defer cancel()
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true},
		"/backend.Backend/PredictStream", grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}
	req := predictOptions(promptText(i), w.Tokens)
	rec.sent = time.Now()
	if err := stream.SendMsg(&req); err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	var buf []byte
	for {
		if err := stream.RecvMsg(&buf); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		now := time.Now()
		rec.messages++
		r, err := decodeReply(buf)
		if err != nil {
			return err
		}
		if r.hasOutput {
			rec.stamps = append(rec.stamps, now)
		}
		if r.tokens != 0 {
			rec.tokens = r.tokens
			v := r.promptMs
			rec.serverMs = &v
		}
	}
}

func run(conn *grpc.ClientConn, w workload) map[string]interface{} {
	var mu sync.Mutex
	next := 0
	records := []*record{}
	cpu0 := cpuSeconds()
	start := time.Now()
	var wg sync.WaitGroup
	for u := 0; u < w.Concurrency; u++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				rec := &record{}
				if i < w.Requests {
					records = append(records, rec)
				}
				mu.Unlock()
				if i >= w.Requests {
					return
				}
				if err := one(conn, i, w, rec); err != nil {
					rec.err = err.Error()
				}
			}
		}()
	}
	wg.Wait()
	wall := time.Since(start).Seconds()
	cpu := cpuSeconds() - cpu0
	summaries := make([]map[string]interface{}, len(records))
	for i, r := range records {
		summaries[i] = r.summary(start)
	}
	return map[string]interface{}{"wall_s": wall, "self_cpu_s": cpu, "requests": summaries}
}

func main() {
	fd := flag.Int("fd", -1, "control socket fd")
	addr := flag.String("addr", "", "worker HOST:PORT")
	flag.Parse()
	ctl, err := net.FileConn(os.NewFile(uintptr(*fd), "control"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "control fd:", err)
		os.Exit(2)
	}
	opts := []grpc.DialOption{grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20))}
	// BENCH_GO_WINDOW=BYTES fixes grpc-go's flow-control windows, which turns
	// off its BDP estimation (a PING per burst of received data). The default
	// (unset) is grpc-go's default dial, as the gateway uses.
	if w, err := strconv.Atoi(os.Getenv("BENCH_GO_WINDOW")); err == nil && w > 0 {
		opts = append(opts, grpc.WithInitialWindowSize(int32(w)), grpc.WithInitialConnWindowSize(int32(w)))
	}
	conn, err := grpc.Dial(*addr, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(2)
	}
	defer conn.Close()
	in := bufio.NewReaderSize(ctl, 1<<20)
	send := func(v interface{}) {
		b, _ := json.Marshal(v)
		_, _ = ctl.Write(append(b, '\n'))
	}
	var pending map[string]interface{}
	for {
		line, err := in.ReadBytes('\n')
		if err != nil {
			return
		}
		var cmd map[string]json.RawMessage
		if err := json.Unmarshal(line, &cmd); err != nil {
			send(map[string]string{"op": "error", "error": err.Error()})
			continue
		}
		var op string
		_ = json.Unmarshal(cmd["op"], &op)
		switch op {
		case "ping":
			send(map[string]string{"op": "pong"})
		case "quit":
			send(map[string]string{"op": "bye"})
			return
		case "results":
			send(pending)
			pending = nil
		case "run":
			var w workload
			if err := json.Unmarshal(cmd["workload"], &w); err != nil || w.Kind != "raw" {
				send(map[string]string{"op": "error", "error": fmt.Sprintf("raw workloads only (%v)", err)})
				continue
			}
			pending = run(conn, w)
			send(map[string]string{"op": "done"})
		default:
			send(map[string]string{"op": "error", "error": "unknown op " + op})
		}
	}
}
