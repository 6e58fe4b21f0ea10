// A FIX 4.4 initiator built on QuickFIX (C++, Debian's libquickfix-dev): the independent
// FIX engine the gateway's tests talk to. tests/test_fix_quickfix.py compiles and drives it.
//
//   test_fix_quickfix_client SETTINGS_FILE USERNAME PASSWORD
//
// Commands on stdin, one a line:
//   AE f=v|f=v|...|SIDE f=v|...|PARTY 448=..|447=..|452=..|PARTY ...
//        a TradeCaptureReport: fields before SIDE are the message's, fields after SIDE go
//        in the one NoSides (552) entry, each PARTY starts a NoPartyIDs (453) entry in it
//   TESTREQ id          a TestRequest (35=1)
//   SETSEQ n            our next outgoing MsgSeqNum (makes a gap the acceptor must fill)
//   SETTARGETSEQ n      the next MsgSeqNum we expect (makes us ask for a resend)
//   LOGOUT              log out
//   QUIT                stop and exit
// Events on stdout, one a line: LOGON, LOGOUT, IN <type> <message>, OUT <type> <message>,
// READY, ERR <text>. SOH is shown as |.
#include <quickfix/Application.h>
#include <quickfix/FileStore.h>
#include <quickfix/Session.h>
#include <quickfix/SessionSettings.h>
#include <quickfix/SocketInitiator.h>
#include <quickfix/fix44/TestRequest.h>
#include <quickfix/fix44/TradeCaptureReport.h>

#ifndef EXCEPT  // QuickFIX 1.15 declares dynamic exception specifications; 1.16 defines EXCEPT
#define EXCEPT(...) throw(__VA_ARGS__)
#endif

#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

static std::mutex out_mutex;

static void emit(const std::string& line) {
  std::lock_guard<std::mutex> lock(out_mutex);
  std::cout << line << std::endl;
}

static std::string show(const FIX::Message& m) {
  std::string s = m.toString();
  for (auto& c : s)
    if (c == '\001') c = '|';
  return s;
}

static std::string type_of(const FIX::Message& m) {
  FIX::MsgType t;
  m.getHeader().getField(t);
  return t.getValue();
}

class Client : public FIX::Application {
 public:
  Client(const std::string& u, const std::string& p) : user(u), password(p) {}
  FIX::SessionID session;
  std::string user, password;

  void onCreate(const FIX::SessionID& id) override { session = id; }
  void onLogon(const FIX::SessionID&) override { emit("LOGON"); }
  void onLogout(const FIX::SessionID&) override { emit("LOGOUT"); }
  void toAdmin(FIX::Message& m, const FIX::SessionID&) override {
    if (type_of(m) == "A") {
      m.setField(553, user);
      m.setField(554, password);
    }
    emit("OUT " + type_of(m) + " " + show(m));
  }
  void toApp(FIX::Message& m, const FIX::SessionID&) EXCEPT(FIX::DoNotSend) override {
    emit("OUT " + type_of(m) + " " + show(m));
  }
  void fromAdmin(const FIX::Message& m, const FIX::SessionID&)
      EXCEPT(FIX::FieldNotFound, FIX::IncorrectDataFormat, FIX::IncorrectTagValue, FIX::RejectLogon) override {
    emit("IN " + type_of(m) + " " + show(m));
  }
  void fromApp(const FIX::Message& m, const FIX::SessionID&)
      EXCEPT(FIX::FieldNotFound, FIX::IncorrectDataFormat, FIX::IncorrectTagValue, FIX::UnsupportedMessageType) override {
    emit("IN " + type_of(m) + " " + show(m));
  }
};

static std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  return out;
}

static void set_pair(FIX::FieldMap& map, const std::string& pair) {
  auto eq = pair.find('=');
  if (eq == std::string::npos) return;
  map.setField(std::stoi(pair.substr(0, eq)), pair.substr(eq + 1));
}

static FIX44::TradeCaptureReport build_report(const std::string& spec) {
  FIX44::TradeCaptureReport report;
  FIX44::TradeCaptureReport::NoSides side;
  FIX44::TradeCaptureReport::NoSides::NoPartyIDs party;
  int mode = 0;  // 0 message, 1 side, 2 party
  bool have_side = false, have_party = false;
  for (const auto& token : split(spec, '|')) {
    std::string t = token;
    if (t.rfind("SIDE ", 0) == 0) {
      mode = 1;
      have_side = true;
      t = t.substr(5);
    } else if (t.rfind("PARTY ", 0) == 0) {
      if (have_party) side.addGroup(party);
      party = FIX44::TradeCaptureReport::NoSides::NoPartyIDs();
      have_party = true;
      mode = 2;
      t = t.substr(6);
    }
    if (mode == 0) set_pair(report, t);
    else if (mode == 1) set_pair(side, t);
    else set_pair(party, t);
  }
  if (have_party) side.addGroup(party);
  if (have_side) report.addGroup(side);
  return report;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " SETTINGS USERNAME PASSWORD" << std::endl;
    return 2;
  }
  try {
    FIX::SessionSettings settings(argv[1]);
    Client client(argv[2], argv[3]);
    FIX::FileStoreFactory store(settings);
    FIX::SocketInitiator initiator(client, store, settings);
    initiator.start();
    emit("READY");
    std::string line;
    while (std::getline(std::cin, line)) {
      try {
        FIX::Session* s = FIX::Session::lookupSession(client.session);
        if (line.rfind("AE ", 0) == 0) {
          FIX44::TradeCaptureReport report = build_report(line.substr(3));
          FIX::Session::sendToTarget(report, client.session);
        } else if (line.rfind("TESTREQ ", 0) == 0) {
          FIX44::TestRequest req(FIX::TestReqID(line.substr(8)));
          FIX::Session::sendToTarget(req, client.session);
        } else if (line.rfind("SETSEQ ", 0) == 0) {
          s->setNextSenderMsgSeqNum(std::stoi(line.substr(7)));
        } else if (line.rfind("SETTARGETSEQ ", 0) == 0) {
          s->setNextTargetMsgSeqNum(std::stoi(line.substr(13)));
        } else if (line == "LOGOUT") {
          s->logout("bye");
        } else if (line == "QUIT") {
          break;
        }
        emit("DONE " + line.substr(0, line.find(' ')));
      } catch (std::exception& e) {
        emit(std::string("ERR ") + e.what());
      }
    }
    initiator.stop(true);
  } catch (std::exception& e) {
    emit(std::string("ERR ") + e.what());
    return 1;
  }
  return 0;
}
